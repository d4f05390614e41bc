"""The foundation layer: what every role, the façade, the tests and the benchmarks share.

Settings and connections (`config`), primary keys (`keys`), topic names and
Kafka clients (`topics`), links (`links`), SQL helpers (`sql`), GTIDs
(`gtid`), the rules of database errors (`dberrors`), the DataJoint catalog
read from INFORMATION_SCHEMA (`catalog`) and external object stores
(`stores`). It imports nothing of the pipeline (`cdc`, `consumers`, `link`)
or of the entry points (`djlink`); `docs/architecture.md` draws the layers.
"""
