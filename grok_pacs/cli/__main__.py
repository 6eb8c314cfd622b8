"""`python -m grok_pacs.cli` = the `grok-pacs` command."""

from grok_pacs.cli.main import main

raise SystemExit(main())
