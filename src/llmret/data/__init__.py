"""Getting data safely: downloads, archives, the BEIR layout, raw files, DPR Wikipedia, TREC runs."""
