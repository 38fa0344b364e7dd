"""On-disk formats: run layout, Parquet feature store, quarantine, errors."""
