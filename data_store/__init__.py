"""Data store: the home directory layout, atomic Parquet tables, DuckDB views, problem loaders, mining."""
