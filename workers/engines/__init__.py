"""Engine bindings: Ray (sessions, extraction actors and tasks, Ray Data, Ray Train) and Dask (jobs over the
feature store). The only modules that import ray, dask or distributed.
"""
