"""All of grok-pacs' runtime configuration, in one typed place.

Read, in increasing priority, from defaults, a TOML file (`--config`, or `GROK_PACS_CONFIG`) and
`GROK_PACS_*` environment variables. Invalid values fail at start with a message naming the setting
(`SettingsError`), never later in a handler.

May import: `grok_pacs.domain`, `grok_pacs.secret_files`, `grok_pacs.addresses` (peers and storage URLs),
`grok_pacs.dicom.sop_classes` (the storage classes offered by default).
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from grok_pacs.addresses import Peer, StorageUrl, check_ae_title
from grok_pacs.dicom.sop_classes import DEFAULT_SOP_CLASSES, LEGACY_SOP_CLASSES
from grok_pacs.secret_files import SecretFileError, SecretFileSource, file_variable

NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")  # a host name, or any name of that shape
AUDIT_SYSLOG_RE = re.compile(r"^(file:.+|(udp|tcp)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5})$")


class SettingsError(RuntimeError):
    """Configuration that cannot work; the message names the offending setting."""


class Settings(BaseSettings):
    """grok-pacs settings. Environment: `GROK_PACS_<FIELD>` (e.g. GROK_PACS_PORT=11112)."""

    # hide_input_in_errors: a rejected value may be a URL with a password; messages name the setting instead.
    model_config = SettingsConfigDict(
        env_prefix="GROK_PACS_", extra="forbid", validate_default=True, hide_input_in_errors=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # GROK_PACS_<NAME>_FILE (grok_pacs.secret_files) ranks with the environment, below explicit values.
        return init_settings, env_settings, SecretFileSource(settings_cls), dotenv_settings, file_secret_settings

    # --- listener -----------------------------------------------------------------------------------
    ae_title: str = "GROK_PACS"  # our AE title; peers must call it exactly
    bind_address: str = "0.0.0.0"  # address the C-STORE listener binds
    port: int = Field(11112, ge=1, le=65535)  # DICOM port of the listener
    allowed_aes: Annotated[list[str], NoDecode] = []  # calling AE allow-list; empty = accept any
    max_associations: int = Field(16, ge=1, le=1024)  # concurrent associations before (2,3,2) rejection
    # Our maximum receive PDU, announced to peers; a longer PDU is aborted before it is read
    # (grok_pacs.ingest.guard). Default chosen by bench/ingest.py (docs/benchmarks.md).
    max_pdu: int = Field(1_048_576, ge=4096, le=64 * 1_048_576)
    max_pending_connections: int = Field(64, ge=1, le=4096)  # connections not yet associated; more closes the oldest
    acse_timeout: float = Field(30.0, gt=0)  # seconds to wait for association messages (and for a new connection's)
    dimse_timeout: float = Field(60.0, gt=0)  # seconds to wait for DIMSE messages
    network_timeout: float = Field(60.0, gt=0)  # seconds of silence before an association is dropped; a PDU's bound
    accept_legacy_photography: bool = False  # also accept VL Photographic and Secondary Capture
    sop_classes: Annotated[list[str], NoDecode] = list(DEFAULT_SOP_CLASSES)  # storage classes offered
    # grok_pacs.dicom.fastpath: event-driven wakeups, bulk reads and direct encoding inside pynetdicom 3.0
    # (process-wide: in `serve` also the SR sender). Off = pynetdicom as released; stored files then carry
    # no SourceApplicationEntityTitle, so an instance recovered after a crash has no calling AE.
    pynetdicom_fast_path: bool = True

    # --- TLS (all optional; certificate and key together turn TLS on) --------------------------------
    tls_certificate: Path | None = None  # PEM server certificate
    tls_key: Path | None = None  # PEM private key of that certificate
    tls_ca: Path | None = None  # PEM CA bundle; when set, clients must present a certificate it signed

    # --- storage and study assembly ------------------------------------------------------------------
    data_dir: Path = Path("./grok-data")  # everything grok-pacs writes lives under here
    quiet_period: float = Field(5.0, ge=0)  # seconds without a new instance before a study is complete
    min_free_disk_mb: int = Field(1024, ge=0)  # refuse new instances below this free space (watermark)
    # Caps on checking one received instance (grok_pacs.dicom.header.Limits), refused with 0xC004 over them:
    # the inflated size of a Deflated Explicit VR dataset (inflated while walked, so this bounds CPU, not
    # memory), and the nesting depth of its sequences (each level is a recursion of the header walk).
    max_inflated_mb: int = Field(1024, ge=1)
    max_sequence_depth: int = Field(32, ge=1, le=200)
    # Refuse a new association before any transfer unless free space covers the watermark plus this much for
    # it and for each association already open (their instances in flight)
    transfer_reserve_mb: int = Field(256, ge=0)
    # Which listener received an instance (instances.received_by): with a server database each listener's
    # recovery and uploader act only on its own rows. Stable across restarts and one per data directory.
    node_id: str = Field(default_factory=socket.gethostname)
    # Retention (grok_pacs.store.retention; run by the listener every retention_interval_s and by
    # `grok-pacs purge`). Only DONE studies (every result delivered) are ever purged, never an undelivered one.
    # Days after delivery that a study's received instances (incoming/ files, their objects) and its result
    # files are kept; 0 = keep forever.
    retention_days: float = Field(30.0, ge=0)
    # Days after delivery that a delivered study's index and outbox rows are kept (after its files are gone);
    # 0 = keep forever. When set, at least retention_days (rows go only with their study's files).
    retention_rows_days: float = Field(0.0, ge=0)
    retention_scratch_hours: float = Field(24.0, gt=0)  # leftover files in tmp/ and scratch/ older than this go
    retention_interval_s: float = Field(3600.0, gt=0)  # seconds between two retention passes of the listener

    # --- object storage (grok_pacs.store.storage; empty storage_url = local files, one box) -----------
    storage_url: StorageUrl | None = None  # s3://BUCKET[/PREFIX] on an S3-compatible store
    storage_endpoint: str = ""  # http(s)://HOST:PORT of that store; empty = boto3's (AWS_ENDPOINT_URL, AWS)
    storage_region: str = ""  # empty = AWS_REGION / AWS_DEFAULT_REGION, else us-east-1
    storage_access_key: str = ""  # with storage_secret_key; both empty = the AWS credential chain (env, files)
    storage_secret_key: SecretStr = SecretStr("")
    storage_timeout: float = Field(10.0, gt=0)  # seconds to connect, and of silence while reading

    # --- queue, model, delivery ----------------------------------------------------------------------
    # Secrets (SecretStr: '**********' in repr, logs and errors; each also read from GROK_PACS_<NAME>_FILE).
    # Celery broker; empty = embedded SQLite broker under data_dir (one box). redis://:PASSWORD@HOST:6379/0, or
    # rediss://... for TLS (broker_tls_* below)
    broker_url: SecretStr = SecretStr("")
    # index and outbox; empty = embedded SQLite file data_dir/index.sqlite (one box). PostgreSQL TLS is in the URL:
    # ?sslmode=verify-full&sslrootcert=/path/ca.crt (libpq parameters)
    database_url: SecretStr = SecretStr("")
    broker_tls_ca: Path | None = None  # PEM CA bundle for a rediss:// broker; None = the system's CAs
    broker_tls_certificate: Path | None = None  # PEM client certificate for a broker requiring one
    broker_tls_key: Path | None = None  # its private key
    queue: str = "grok"  # Celery queue for analyse jobs (name it per GPU type on many nodes)
    bundle: Path | None = None  # model bundle directory the worker serves
    destination: Peer | None = None  # PACS that receives the SRs (AE@HOST:PORT)
    # TLS of result delivery (grok_pacs.dicom.tls): a CA turns it on; the PACS certificate must be signed by it
    # and name destination's host (DNS or IP SAN) unless destination_tls_verify_hostname is off.
    destination_tls_ca: Path | None = None  # PEM CA bundle that signed the PACS certificate
    destination_tls_certificate: Path | None = None  # PEM client certificate, for a PACS requiring one
    destination_tls_key: Path | None = None  # its private key
    destination_tls_verify_hostname: bool = True
    pdf_report: bool = True  # also send one Encapsulated PDF report per study (for viewers without SR display)
    delivery_max_retries: int = Field(8, ge=0)  # transient delivery failures retried this many times
    delivery_backoff_s: float = Field(2.0, gt=0)  # first delivery retry after this long; doubles per retry
    delivery_backoff_max_s: float = Field(300.0, gt=0)  # longest wait between two delivery retries
    job_time_limit: float = Field(3600.0, gt=0)  # seconds an analyse job may run (broker visibility above)
    # Transient database, broker and object-store errors in analyse and delivery jobs (grok_pacs.jobs.retry):
    # retried with exponential backoff from retry_base_s, capped at retry_cap_s per wait, jittered, for about
    # retry_max_seconds in all (a database restart or failover takes seconds to minutes); then the reaper's turn.
    retry_max_seconds: float = Field(600.0, ge=0)
    retry_base_s: float = Field(1.0, gt=0)
    retry_cap_s: float = Field(60.0, gt=0)
    # The reaper (grok_pacs.ingest.reaper), in every listener: a study QUEUED/ANALYSING/DELIVERING untouched for
    # reaper_lease_s (database time), whose analysis no live worker holds, gets its job published again; an
    # outbox result likewise its delivery. None = job_time_limit + retry_max_seconds (no live job holds work longer).
    reaper_lease_s: float | None = Field(None, gt=0)
    reaper_interval_s: float = Field(30.0, gt=0)  # seconds between two reaper passes
    # Drift figures on /metrics (grok_pacs.ops.drift; docs/deploy.md, "Drift"): every listener recomputes them
    # from the results register each drift_interval_s (0 = off) over the last drift_window_hours (the recent
    # window) and the window before it (the reference of the label mix's population-stability index).
    drift_window_hours: float = Field(168.0, gt=0)
    drift_interval_s: float = Field(60.0, ge=0)
    metrics_port: int = Field(0, ge=0, le=65535)  # Prometheus / health HTTP port; 0 = off
    # Address of /metrics and /health, apart from the DICOM bind_address. Loopback by default (nothing outside the
    # host reads them); containers set 0.0.0.0 so Kubernetes probes and Prometheus reach the pod IP.
    metrics_bind_address: str = "127.0.0.1"
    # Bearer token /metrics requires (`Authorization: Bearer TOKEN`, else 401); /health answers without it,
    # but only {"status"} (no details) unless the token comes along. Empty = no token.
    metrics_token: SecretStr = SecretStr("")
    # DICOM audit messages (grok_pacs.ops.audit) as RFC 5424 syslog: "file:PATH" (one message a line),
    # "udp://HOST:PORT" or "tcp://HOST:PORT" (a collector; TCP framed by octet count). Empty = no audit trail.
    audit_syslog: str = ""

    # --- clinician review page (grok_pacs.review; docs/deploy.md, "Clinician review") ----------------
    review_port: int = Field(0, ge=0, le=65535)  # HTTP port of the review page (`serve`, `review`); 0 = off
    # Loopback by default: the page is meant to sit behind a TLS reverse proxy on the same host.
    review_bind_address: str = "127.0.0.1"
    # Signs the session cookie and the CSRF tokens (secret; also GROK_PACS_REVIEW_SECRET_KEY_FILE). Required,
    # at least 32 characters, when review_port is set; changing it logs everyone out.
    review_secret_key: SecretStr = SecretStr("")
    # Identity from a trusted reverse proxy that authenticates the clinicians (SSO): the user name comes in this
    # request header and the role (reviewer/administrator) in review_trusted_role_header, and the page's own
    # login is off. Only for a page reachable through that proxy alone (it must strip both headers from the
    # client's request): anyone who reaches the port directly could send them. "" = off (own accounts).
    review_trusted_user_header: str = ""
    review_trusted_role_header: str = "X-Remote-Role"
    # The clinicians' organisation, named in each verified SR (VerifyingOrganization); required with review_port.
    review_organization: str = ""
    # Session cookie only over HTTPS (Secure). Off only where the page is served over plain HTTP on loopback.
    review_cookie_secure: bool = True

    # --- gradability gate (grok_pacs.analysis.quality; an eye failing it gets no diagnosis) -----------
    disposition_table: Path | None = None  # TOML [[rule]] table replacing grok_pacs.report.dispositions' default
    min_label_probability: float | None = Field(None, ge=0, le=1)  # Indeterminate threshold; None = the bundle's
    # the LLM's float type: auto = bf16 on a CUDA GPU with bf16, else fp32; "bf16" on a CPU with AMX tiles is
    # about 1/3 faster, its batched rows no longer bit-identical to single eyes (grok_pacs.model.precision)
    llm_precision: Literal["auto", "bf16", "fp32"] = "auto"
    gate_min_cfp_side: int = Field(224, ge=1)  # px, shorter side of a CFP
    gate_min_oct_rows: int = Field(64, ge=1)  # px, both axes of an OCT B-scan
    gate_min_oct_frames: int = Field(1, ge=1)  # B-scans per OCT volume
    gate_min_field_coverage: float = Field(0.25, ge=0, le=1)  # fraction of the CFP frame that is lit retina
    gate_max_field_offset: float = Field(0.25, ge=0, le=1)  # field centroid from image centre, fraction of side
    gate_min_exposure: float = Field(0.08, ge=0, le=1)  # mean luminance inside the field
    gate_max_exposure: float = Field(0.92, ge=0, le=1)
    gate_max_saturated: float = Field(0.25, ge=0, le=1)  # fraction of field pixels saturated in every channel
    gate_min_contrast: float = Field(0.015, ge=0, le=1)  # luminance std inside the field
    gate_min_sharpness: float = Field(0.04, ge=0)  # std(Laplacian) / std(image) inside the field at 512 px
    gate_max_decoder_fill: float = Field(0.05, ge=0, le=1)  # fraction of 16-px block rows repeating one lit tile
    gate_max_blank_frames: float = Field(0.5, ge=0, le=1)  # fraction of blank OCT frames
    gate_max_saturated_frames: float = Field(0.5, ge=0, le=1)  # fraction of saturated OCT frames
    gate_min_oct_signal: float = Field(0.15, ge=0, le=1)  # (p99 - median) / full scale, central B-scans
    gate_min_isotropy: float = Field(0.6, ge=0, le=1)  # CFP detail, weakest / strongest direction (motion blur)
    gate_max_axial_jump: float = Field(0.08, ge=0, le=1)  # OCT retina depth jump between B-scans, of the height

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return check_ae_title(value, "ae_title")

    @field_validator("allowed_aes", "sop_classes", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("allowed_aes")
    @classmethod
    def _allowed(cls, value: list[str]) -> list[str]:
        return [check_ae_title(item, "allowed_aes") for item in value]

    @field_validator("sop_classes")
    @classmethod
    def _sop_classes(cls, value: list[str]) -> list[str]:
        for uid in value:
            if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid) or len(uid) > 64:
                raise ValueError(f"sop_classes: {uid!r} is not a UID")
        return value

    @field_validator("audit_syslog")
    @classmethod
    def _audit_syslog(cls, value: str) -> str:
        value = value.strip()
        if value and not AUDIT_SYSLOG_RE.match(value):
            raise ValueError(f"audit_syslog: {value!r} is not file:PATH, udp://HOST:PORT or tcp://HOST:PORT")
        return value

    @field_validator("review_trusted_user_header", "review_trusted_role_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        value = value.strip()
        if value and not re.fullmatch(r"[A-Za-z0-9-]{1,64}", value):
            raise ValueError(f"{value!r} is not an HTTP header name (letters, digits, '-')")
        return value

    @model_validator(mode="after")
    def _review(self) -> Settings:
        if not self.review_port:
            return self
        if len(self.review_secret_key.get_secret_value()) < 32:
            raise ValueError("review_secret_key: at least 32 characters are needed with review_port")
        if not self.review_organization.strip():
            raise ValueError("review_organization: needed with review_port (named in each verified SR)")
        if self.review_trusted_user_header and not self.review_trusted_role_header:
            raise ValueError("review_trusted_role_header: needed with review_trusted_user_header")
        return self

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str) -> str:
        value = value.strip()
        if not NODE_ID_RE.match(value):
            raise ValueError(f"node_id: {value!r} is not 1-253 letters, digits, '.', '_' or '-' (a host name)")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        if url and not url.startswith(("sqlite:///", "postgresql+psycopg://")):
            raise ValueError("database_url: expected postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB or sqlite:///PATH")
        return value

    @field_validator("destination", mode="before")
    @classmethod
    def _destination(cls, value: Any) -> Any:
        if isinstance(value, str):
            return Peer.parse(value) if value.strip() else None
        return value

    @field_validator("storage_url", mode="before")
    @classmethod
    def _storage_url(cls, value: Any) -> Any:
        if isinstance(value, str):
            return StorageUrl.parse(value) if value.strip() else None
        return value

    @field_validator("storage_endpoint")
    @classmethod
    def _storage_endpoint(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not re.fullmatch(r"https?://[^/\s@]+(:\d+)?", value):
            raise ValueError(f"storage_endpoint: {value!r} is not http(s)://HOST[:PORT]")
        return value

    @model_validator(mode="after")
    def _storage(self) -> Settings:
        if bool(self.storage_access_key) != bool(self.storage_secret_key.get_secret_value()):
            raise ValueError("storage_access_key and storage_secret_key must be given together")
        if self.storage_url is None and (self.storage_endpoint or self.storage_access_key):
            raise ValueError("storage_endpoint and storage credentials need storage_url (s3://BUCKET[/PREFIX])")
        return self

    @model_validator(mode="after")
    def _retention(self) -> Settings:
        rows, files = self.retention_rows_days, self.retention_days
        if rows and (not files or rows < files):
            raise ValueError("retention_rows_days must be 0 or at least retention_days (and retention_days not 0)")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_certificate is None) != (self.tls_key is None):
            raise ValueError("tls_certificate and tls_key must be given together")
        for name in ("tls_certificate", "tls_key", "tls_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: file {path} does not exist")
        if self.disposition_table is not None and not Path(self.disposition_table).is_file():
            raise ValueError(f"disposition_table: file {self.disposition_table} does not exist")
        if self.tls_ca is not None and self.tls_certificate is None:
            raise ValueError("tls_ca needs tls_certificate and tls_key")
        return self

    @model_validator(mode="after")
    def _delivery_and_broker_tls(self) -> Settings:
        for prefix in ("destination_tls", "broker_tls"):
            if (getattr(self, f"{prefix}_certificate") is None) != (getattr(self, f"{prefix}_key") is None):
                raise ValueError(f"{prefix}_certificate and {prefix}_key must be given together")
            for name in (f"{prefix}_ca", f"{prefix}_certificate", f"{prefix}_key"):
                path = getattr(self, name)
                if path is not None and not Path(path).is_file():
                    raise ValueError(f"{name}: file {path} does not exist")
        if self.destination_tls_certificate is not None and self.destination_tls_ca is None:
            raise ValueError("destination_tls_certificate needs destination_tls_ca (the CA turns delivery TLS on)")
        broker_tls = self.broker_tls_ca or self.broker_tls_certificate
        if broker_tls and not self.broker_url.get_secret_value().startswith("rediss://"):
            raise ValueError("broker_tls_* need a rediss:// broker_url (Redis over TLS)")
        return self

    # --- derived paths -------------------------------------------------------------------------------
    @property
    def tls_enabled(self) -> bool:
        return self.tls_certificate is not None

    @property
    def accepted_sop_classes(self) -> list[str]:
        extra = [uid for uid in LEGACY_SOP_CLASSES if self.accept_legacy_photography]
        return list(dict.fromkeys([*self.sop_classes, *extra]))

    @property
    def resolved_broker_url(self) -> str:
        """The broker URL; the embedded default is a durable SQLite database in the data directory."""
        if self.broker_url:
            return self.broker_url.get_secret_value()
        return f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"

    @property
    def index_path(self) -> Path:
        return self.data_dir / "index.sqlite"

    @property
    def resolved_database_url(self) -> str:
        """The index database: `database_url`, else the embedded SQLite file in the data directory."""
        return self.database_url.get_secret_value() or f"sqlite:///{self.index_path.resolve()}"


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Settings from defaults < TOML file < environment < explicit overrides (CLI flags).

    The TOML file is `config`, else `$GROK_PACS_CONFIG` when set. Raises SettingsError with the
    setting's name on any invalid value.
    """
    path = config or (Path(os.environ["GROK_PACS_CONFIG"]) if os.environ.get("GROK_PACS_CONFIG") else None)
    file_values: dict[str, Any] = {}
    if path is not None:
        try:
            file_values = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise SettingsError(f"config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc
        file_values = {key.replace("-", "_"): value for key, value in file_values.items()}
    env_names = {
        name
        for name in Settings.model_fields
        if f"GROK_PACS_{name.upper()}" in os.environ or os.environ.get(file_variable(name))
    }
    # Environment beats the file: drop file values that the environment sets.
    merged = {key: value for key, value in file_values.items() if key not in env_names}
    merged.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return Settings(**merged)
    except SecretFileError as exc:
        raise SettingsError(str(exc)) from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from exc


def broker_ssl_options(settings: Settings) -> dict[str, Any] | None:
    """TLS options of a rediss:// broker (kombu hands them to redis-py), None for any other broker.

    The server certificate is always verified, host name included: against broker_tls_ca, else the
    system's CAs; broker_tls_certificate/_key are presented to a Redis with `tls-auth-clients yes`.
    The broker password goes in the URL (rediss://:PASSWORD@HOST:6380/0), which is a secret setting.
    """
    if not settings.resolved_broker_url.lower().startswith("rediss://"):
        return None
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
    if settings.broker_tls_ca is not None:
        options["ssl_ca_certs"] = str(settings.broker_tls_ca)
    if settings.broker_tls_certificate is not None:
        options["ssl_certfile"] = str(settings.broker_tls_certificate)
        options["ssl_keyfile"] = str(settings.broker_tls_key)
    return options
