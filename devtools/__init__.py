"""Development tools, outside the runtime package: the local services launcher and the demo.

`python -m devtools.services up` starts two MariaDB servers and a Kafka broker
on loopback for the tests, the benchmarks and `./dev demo`; production sites
run their own servers and only `djlink run`.
"""
