"""Operations: Prometheus metrics (`metrics`), health checks (`health`), the HTTP server that serves both
on metrics_port (`observability`), log set-up (`logs`), keeping patient attributes out of logs and stored
reasons (`phi`), the DICOM audit trail over syslog (`audit`), background passes that outlive
outages (`periodic`) and the model's drift figures per bundle version (`drift`: the results register is
handed in by the caller, as `store` imports `ops`).

May import: `grok_pacs.config`, `grok_pacs.domain`.
"""
