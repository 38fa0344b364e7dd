"""On-disk formats: dataset manifest, shard records, Parquet feature stores, model artifacts, index folders,
quarantine; contracts/ is the bottom layer.
"""
