"""djlink: event-driven CDC replication of DataJoint tables between MariaDB servers over Kafka."""
