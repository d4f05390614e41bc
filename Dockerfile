# The djlink services (capture, agent, applier) for docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cdc cdc
COPY consumers consumers
COPY link link
COPY schemas schemas
COPY djlink djlink
COPY foundation foundation
COPY devtools devtools
RUN pip install --no-cache-dir .
ENTRYPOINT ["djlink"]
