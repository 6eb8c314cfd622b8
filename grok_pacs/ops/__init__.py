"""Operations: Prometheus metrics (`metrics`), health checks (`health`), the HTTP server that serves both
on metrics_port (`observability`), log set-up (`logs`), keeping patient attributes out of logs and stored
reasons (`phi`), the DICOM audit trail over syslog (`audit`) and background passes that outlive
outages (`periodic`).

May import: `grok_pacs.config`, `grok_pacs.domain`.
"""
