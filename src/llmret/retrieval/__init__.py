"""Models, encoders and indexes: BM25, dense vectors and FAISS, sparse vectors and their index."""
