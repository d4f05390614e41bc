"""`djlink verify`: proves that the destination holds exactly the shared entities of each link, byte for byte.

- `compare`: what is compared and how drill-down narrows a difference down to a row and a column (pure);
- `sql`: the expressions each server computes (a row as canonical bytes, checksums, key ranges);
- `servers`: the two sides over SQL, each in one read-only consistent snapshot, and the objects' bytes;
- `command`: the links to verify, the progress bar; `report`: what the user reads (text or JSON).

docs/verify.md says what it proves, and what it cannot.
"""
