"""Operations: Prometheus metrics (`metrics`), health checks (`health`), the HTTP server that serves both
on metrics_port (`observability`) and log set-up (`logs`).

May import: `grok_pacs.config`, `grok_pacs.domain`.
"""
