"""The `grok-pacs` command line: argument parsing and exit codes only; every command calls into the
package that owns the work. `main` (the parser, settings from arguments, exit codes), `options` (argument
blocks shared by commands), `ingest` (listen, echo, send, studies), `jobs` (serve, worker), `report`
(report FILE.dcm), `database` (db upgrade, db current), `retention` (purge), `withdraw` (withdraw
STUDY_UID: a study's results withdrawn by an IOCM rejection note), `review` (review, reviewer add).

The top layer, which nothing imports. May import: `grok_pacs` (every room).
"""
