"""The `grok-pacs` command line: argument parsing and exit codes only; every command calls into the
package that owns the work. The top layer: may import anything in `grok_pacs`; nothing imports it.
"""
