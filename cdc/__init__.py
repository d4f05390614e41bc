"""Change data capture: the source site's binlog reader and snapshot reader.

Laid out by Debezium's concepts, a module each:
- `events`: a row change and the unit (source transaction or snapshot chunk) it belongs to;
- `table_shapes`: which columns a table has (its shape), cached over the catalog (`foundation.catalog`);
- `preconditions`: what the source server must be configured with;
- `streaming`: the binlog source, turning row events into change units;
- `snapshot`: the snapshot source, reading given entities (master + parts) consistently;
- `dispatcher`: the event dispatcher, turning units into Kafka records in one transaction;
- `coordinator`: runs the two sources, follows links and signals, owns the producer.
"""
