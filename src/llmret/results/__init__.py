"""From runs to tables: evaluation, the tables and plots, expected scores, footprint tables."""
