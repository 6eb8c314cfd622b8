"""Operations: Prometheus metrics (`metrics`), the health/metrics HTTP server (`health`) and log set-up
(`logs`).

May import: `grok_pacs.config`, `grok_pacs.domain`.
"""
