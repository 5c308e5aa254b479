"""Everything around the certification library: data sources, storage, the Ray driver and
workers, Parquet certificates, reports and the ``scalecert`` command line."""
