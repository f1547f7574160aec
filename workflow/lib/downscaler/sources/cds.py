"""Climate Data Store (CDS) client wrapper: credentials, requests, retries, errors, atomic landing.

The real `cdsapi` client (0.7.x, which delegates to `ecmwf-datastores-client` for today's
personal access tokens) does the protocol; this module decides what to ask, checks what comes
back, turns the service's many failure modes into one `CDSError` naming the request and the fix,
and lands every file atomically so an interrupted run never leaves a file that looks complete.
"""

from __future__ import annotations

import calendar
import itertools
import logging
import os
import re
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import requests

from downscaler.io import atomic_path
from downscaler.settings import Era5Config, from_schema

LOG = logging.getLogger(__name__)

DEFAULT_URL = "https://cds.climate.copernicus.eu/api"
PROFILE_URL = "https://cds.climate.copernicus.eu/profile"
CREDENTIALS_HELP = (
    "Put your CDS credentials in ~/.cdsapirc (or the file named by CDSAPI_RC), two lines:\n"
    f"    url: {DEFAULT_URL}\n"
    "    key: <personal access token>\n"
    "or set the environment variables CDSAPI_URL and CDSAPI_KEY. The token is on your CDS "
    f"profile page ({PROFILE_URL}) after logging in."
)
# A personal access token is a UUID today; accept any simple token but nothing with spaces or
# placeholder brackets, which are the usual copy-paste mistakes.
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
# netCDF-C / HDF5 are not thread-safe: every netCDF access made from worker threads in this
# process (validation, merging; the test server's writer too) goes through this lock.
NETCDF_LOCK = threading.RLock()
_NETCDF_MAGIC = (b"CDF\x01", b"CDF\x02", b"CDF\x05", b"\x89HDF\r\n\x1a\n")


class CDSError(RuntimeError):
    """One clear failure of a CDS request: names the request (dataset + summary) and the fix."""


@dataclass(frozen=True)
class Request:
    """One CDS retrieval: what to ask, where it lands and what the answer must contain.

    `target` is relative to the raw directory. `variables` are the names expected inside the
    file (ERA5 short names such as `t2m`; CMIP6 names such as `tas`) and `times` the expected
    time steps as ISO strings (empty: not checked, e.g. CMIP6 with model calendars).
    """

    dataset: str
    request: dict[str, Any]
    target: Path
    variables: tuple[str, ...]
    times: tuple[str, ...] = ()
    label: str = ""
    fields: int = field(default=0, compare=False)

    @property
    def summary(self) -> str:
        """Short human summary used in every message, e.g. `dataset (2m_temperature 2000-03)`."""
        return f"{self.dataset} ({self.label or self.target})"


# ---------------------------------------------------------------------------------------------
# Credentials
# ---------------------------------------------------------------------------------------------


def _read_rc(path: Path) -> dict[str, str]:
    """Parse the `key: value` lines of a .cdsapirc as cdsapi does (split on the first colon)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if ":" in line:
            k, v = line.strip().split(":", 1)
            out[k.strip()] = v.strip()
    return out


def check_credentials(env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Find and sanity-check the CDS url and key before any request is sent.

    Same precedence as cdsapi: CDSAPI_URL/CDSAPI_KEY, then the file CDSAPI_RC or ~/.cdsapirc.
    Returns (url, key); raises CDSError saying where the credentials go when they are missing
    or malformed (legacy `UID:KEY` keys and the retired `/api/v2` endpoint included).
    """
    env = os.environ if env is None else env
    url = env.get("CDSAPI_URL") or None
    key = env.get("CDSAPI_KEY") or None
    home = env.get("HOME") or os.path.expanduser("~")
    rc = Path(env["CDSAPI_RC"]) if env.get("CDSAPI_RC") else Path(home) / ".cdsapirc"
    where = "CDSAPI_URL/CDSAPI_KEY"
    if url is None or key is None:
        if not rc.is_file():
            missing = [n for n, v in (("CDSAPI_URL", url), ("CDSAPI_KEY", key)) if v is None]
            raise CDSError(
                f"No CDS credentials: {rc} does not exist and {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set.\n{CREDENTIALS_HELP}"
            )
        try:
            conf = _read_rc(rc)
        except (OSError, UnicodeDecodeError) as exc:
            raise CDSError(
                f"Cannot read CDS credentials file {rc}: {exc}.\n{CREDENTIALS_HELP}"
            ) from exc
        url = url or conf.get("url") or None
        key = key or conf.get("key") or None
        where = str(rc)
        if url is None or key is None:
            lacking = " and ".join(n for n, v in (("url", url), ("key", key)) if v is None)
            raise CDSError(f"CDS credentials file {rc} has no {lacking} line.\n{CREDENTIALS_HELP}")
    url = url.strip().rstrip("/")
    key = key.strip()
    if not re.match(r"^https?://", url):
        raise CDSError(f"CDS url {url!r} (from {where}) is not an http(s) URL.\n{CREDENTIALS_HELP}")
    if re.search(r"/api/v2$", url):
        raise CDSError(
            f"CDS url {url!r} (from {where}) is the retired legacy CDS endpoint; use "
            f"{DEFAULT_URL} with a personal access token.\n{CREDENTIALS_HELP}"
        )
    if ":" in key:
        raise CDSError(
            f"CDS key from {where} looks like a legacy 'UID:API-KEY' pair; the current CDS "
            f"needs the personal access token alone.\n{CREDENTIALS_HELP}"
        )
    if not _TOKEN_RE.match(key):
        raise CDSError(
            f"CDS key from {where} is malformed ({len(key)} characters, contains spaces or "
            f"symbols; a placeholder such as '<personal access token>' left in?).\n"
            f"{CREDENTIALS_HELP}"
        )
    return url, key


# ---------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------


def make_client(
    url: str,
    key: str,
    *,
    retry_max: int = 5,
    sleep_max: float = 30.0,
    timeout: float = 60.0,
    quiet: bool = True,
) -> Any:
    """Build the real `cdsapi.Client` with bounded retries (the library default is 500 x 120 s).

    HTTP-level transient errors (5xx, 429, timeouts, connection resets) are retried inside the
    client with exponential backoff from `sleep_max` (doubling, capped at 16x); `sleep_max` also
    caps the interval between job-status polls. A token without a colon makes cdsapi hand the
    work to ecmwf-datastores' LegacyClient, which speaks the current CDS protocol.
    """
    import cdsapi

    client = cdsapi.Client(
        url=url,
        key=key,
        retry_max=max(1, int(retry_max)),
        sleep_max=float(sleep_max),
        timeout=timeout,
        quiet=quiet,
        progress=False,
    )
    inner = getattr(client, "client", None)
    if inner is not None and sleep_max > 0:
        # multiurl.robust accepts (min, max, ratio): exponential backoff for HTTP retries, while
        # the scalar sleep_max keeps capping status polling.
        inner.retry_after = (float(sleep_max), float(sleep_max) * 16, 2)
    return client


def download_settings(config: Mapping[str, Any], section: str = "era5") -> Era5Config:
    """The CDS download settings of a request config: ``era5.*`` overridden by
    ``config[section]`` (a CMIP6 request's own); keys given by neither (a hand-written request
    config) come from the schema's defaults."""
    keys = {f.name for f in fields(Era5Config)}
    given = {**(config.get("era5") or {}), **(config.get(section) or {})}
    return from_schema("era5", {k: v for k, v in given.items() if k in keys})


def _client_settings(config: Mapping[str, Any], section: str = "era5") -> dict[str, Any]:
    """Retry/parallel settings (see ``download_settings``) under the client's names."""
    s = download_settings(config, section)
    return {
        "retries": int(s.retries),
        "retry_wait_s": float(s.retry_wait_s),
        "max_parallel": int(s.max_parallel_requests),
        "max_fields": int(s.max_fields_per_request),
    }


def _default_factory(config: Mapping[str, Any], section: str) -> Callable[[str, str], Any]:
    s = _client_settings(config, section)

    def factory(url: str, key: str) -> Any:
        return make_client(url, key, retry_max=s["retries"] + 1, sleep_max=s["retry_wait_s"])

    return factory


# ---------------------------------------------------------------------------------------------
# Validation of landed files
# ---------------------------------------------------------------------------------------------


def expected_times(request: Mapping[str, Any]) -> tuple[str, ...]:
    """ISO time steps (minute precision) a CDS request with year/month/day/time asks for."""
    def as_list(v: Any) -> list[str]:
        return [str(x) for x in (v if isinstance(v, list | tuple) else [v])]

    if not all(k in request for k in ("year", "month", "day")):
        return ()
    hours = as_list(request.get("time", ["00:00"]))
    out = []
    for y, m, d in itertools.product(
        as_list(request["year"]), as_list(request["month"]), as_list(request["day"])
    ):
        yi, mi, di = int(y), int(m), int(d)
        if di > calendar.monthrange(yi, mi)[1]:
            continue  # the CDS silently skips impossible dates such as 31 February
        out.extend(f"{yi:04d}-{mi:02d}-{di:02d}T{h[:5]}" for h in hours)
    return tuple(sorted(out))


def _kind(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK"):
        return "zip"
    if any(head.startswith(m) for m in _NETCDF_MAGIC):
        return "netcdf"
    if head.startswith(b"GRIB"):
        return "grib"
    return "unknown"


def _file_contents(path: Path) -> tuple[set[str], set[str]]:
    """Variables and ISO times in a netCDF file or a zip of netCDF members."""
    import xarray as xr

    names: set[str] = set()
    times: set[str] = set()

    def scan(ds: Any) -> None:
        names.update(str(v) for v in ds.data_vars)
        for tname in ("valid_time", "time"):
            if tname in ds.coords and np.issubdtype(ds[tname].dtype, np.datetime64):
                vals = np.atleast_1d(ds[tname].values).astype("datetime64[m]")
                times.update(str(t) for t in vals)
                break

    kind = _kind(path)
    if kind == "netcdf":
        with xr.open_dataset(path, decode_timedelta=False) as ds:
            scan(ds)
    elif kind == "zip":
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.namelist() if m.endswith(".nc")]
            if not members:
                raise ValueError(f"zip holds no netCDF member (members: {zf.namelist()})")
            for m in members:
                with zf.open(m) as fh, xr.open_dataset(fh.read(), decode_timedelta=False) as ds:
                    scan(ds)
    else:
        raise ValueError(f"not a netCDF or zip file (starts with {_peek(path)!r})")
    return names, times


def _peek(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(16)


def check_file(path: Path, req: Request) -> str | None:
    """Return why `path` is not a complete answer to `req`, or None when it is."""
    if not path.is_file() or path.stat().st_size == 0:
        return "missing or empty"
    try:
        with NETCDF_LOCK:
            names, times = _file_contents(path)
    except Exception as exc:  # any unreadable file is simply "invalid, fetch again"
        return f"unreadable ({type(exc).__name__}: {exc})"
    missing = [v for v in req.variables if v not in names]
    if missing:
        return f"lacks variable(s) {missing} (has {sorted(names)})"
    if req.times:
        want = set(req.times)
        lost = sorted(want - times)
        if lost:
            return f"lacks {len(lost)} of {len(want)} time step(s), first {lost[0]}"
    return None


# ---------------------------------------------------------------------------------------------
# Error mapping
# ---------------------------------------------------------------------------------------------


class _Transient(Exception):
    """A failure worth resubmitting (5xx after the client's retries, reset, timeout, truncation)."""


class _Damaged(_Transient):
    """An answer that arrived whole (its advertised size) but is not a readable file."""


def _server_text(exc: BaseException) -> str:
    return str(exc).strip()


def _classify(exc: BaseException, req: Request, config: Mapping[str, Any]) -> BaseException:
    """Map a client exception to CDSError (final) or _Transient (worth another try)."""
    from ecmwf.datastores.processing import DownloadError, ProcessingFailedError

    s = req.summary
    text = _server_text(exc)
    if isinstance(exc, CDSError | _Transient):
        return exc
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        low = text.lower()
        if code == 401:
            return CDSError(
                f"CDS rejected the API key (401 Unauthorized) for {s}. Copy the personal access "
                f"token from {PROFILE_URL} into ~/.cdsapirc (key: ...) or CDSAPI_KEY.\n"
                f"Server said: {text}"
            )
        if code == 403 and "licen" in low:
            urls = re.findall(r"https?://\S+", text)
            accept = urls[-1].rstrip(".,)") if urls else (
                f"https://cds.climate.copernicus.eu/datasets/{req.dataset}"
                "?tab=download#manage-licences"
            )
            return CDSError(
                f"The licence of dataset {req.dataset!r} has not been accepted for this account "
                f"(403) for {s}. Log in and accept it at {accept}, then re-run.\n"
                f"Server said: {text}"
            )
        if code == 403 and ("cost" in low or "too large" in low or "limit" in low):
            mf = _client_settings(config)["max_fields"]
            return CDSError(
                f"The CDS refused {s} as too large (403 cost limits exceeded; {req.fields} "
                f"fields). Split it smaller: lower era5.max_fields_per_request (now {mf}) or "
                f"shorten the period/region.\nServer said: {text}"
            )
        if code >= 500 or code in (408, 429):
            return _Transient(f"HTTP {code} from the CDS: {text}")
        return CDSError(
            f"The CDS job for {s} failed (HTTP {code}). Fix the request keys named below "
            f"(variable, date, area, grid) and re-run.\nServer said: {text}"
        )
    if isinstance(exc, ProcessingFailedError):
        return CDSError(f"The CDS job for {s} failed on the server.\nServer said: {text}")
    if isinstance(exc, DownloadError) or (
        isinstance(exc, AssertionError) and "size mismatch" in text
    ):
        return _Transient(f"truncated download ({text})")
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return _Transient(f"truncated download, connection broken ({text})")
    if isinstance(exc, requests.Timeout):
        return _Transient(f"timeout talking to the CDS ({text})")
    if isinstance(exc, requests.ConnectionError):
        return _Transient(f"connection to the CDS failed or was reset ({text})")
    return CDSError(f"Unexpected error while fetching {s}: {type(exc).__name__}: {text}")


# ---------------------------------------------------------------------------------------------
# Cost estimate and splitting
# ---------------------------------------------------------------------------------------------


def _split(req: Request) -> list[Request] | None:
    """Halve a request along days, then variables, then pressure levels (None: indivisible)."""
    r = req.request
    for key in ("day", "variable", "pressure_level", "year"):
        vals = r.get(key)
        if isinstance(vals, list) and len(vals) > 1:
            half = len(vals) // 2
            parts = []
            for i, chunk in enumerate((vals[:half], vals[half:])):
                sub = {**r, key: chunk}
                vars_ = req.variables
                if key == "variable":
                    # keep only the file names that belong to this chunk, in the same order
                    idx = [r["variable"].index(v) for v in chunk]
                    vars_ = tuple(req.variables[j] for j in idx if j < len(req.variables))
                parts.append(
                    replace(
                        req,
                        request=sub,
                        target=req.target.with_name(f"{req.target.stem}.part{i}{req.target.suffix}"),
                        variables=vars_,
                        times=expected_times(sub) if req.times else (),
                        label=f"{req.label} part {i + 1}/2",
                        fields=max(1, req.fields * len(chunk) // max(1, len(vals))),
                    )
                )
            return parts
    return None


def _estimate(client: Any, req: Request) -> tuple[float, float] | None:
    """(cost, limit) from the service's costing endpoint, or None when it is not available."""
    inner = getattr(client, "client", None)
    if inner is None or not hasattr(inner, "estimate_costs"):
        return None
    try:
        reply = inner.estimate_costs(req.dataset, req.request)
    except requests.HTTPError as exc:
        if exc.response is not None and exc.response.status_code in (401, 403):
            raise
        LOG.warning("cost estimate unavailable for %s: %s", req.summary, exc)
        return None
    except Exception as exc:  # costing is advisory: never fail a download on it
        LOG.warning("cost estimate unavailable for %s: %s", req.summary, exc)
        return None
    cost, limit = reply.get("cost"), reply.get("limit")
    if cost is None or limit is None:
        return None
    return float(cost), float(limit)


# ---------------------------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------------------------


def _download_one(client: Any, req: Request, final: Path) -> None:
    """Retrieve `req` into `final` atomically and check the answer before it gets its name."""
    with atomic_path(final) as tmp:
        client.retrieve(req.dataset, req.request, str(tmp))
        why = check_file(tmp, req)
        if why is not None:
            kind = _kind(tmp) if tmp.exists() else "nothing"
            if kind in ("netcdf", "zip") and why.startswith("unreadable"):
                # complete bytes as advertised, but a cut or corrupt file: fetch it again
                raise _Damaged(f"damaged download: the {kind} answer cannot be read ({why})")
            raise CDSError(
                f"The CDS answered {req.summary} with a file that is not what was asked "
                f"({kind}: {why}). Check the request keys (variable names, dates, "
                f"data_format=netcdf) and re-run; the file was not kept."
            )


def _merge_parts(parts: list[Path], final: Path) -> None:
    """Combine the netCDF answers of a split request into one file at `final` (atomically)."""
    import xarray as xr

    with NETCDF_LOCK:
        dss = [xr.open_dataset(p, decode_timedelta=False) for p in parts]
        try:
            merged = xr.combine_by_coords(dss, combine_attrs="override", data_vars="all")
            with atomic_path(final) as tmp:
                merged.to_netcdf(tmp)
        finally:
            for ds in dss:
                ds.close()


def _fetch_request(
    req: Request,
    raw_dir: Path,
    config: Mapping[str, Any],
    get_client: Callable[[], Any],
    depth: int = 0,
) -> Path:
    """Fetch one request (estimating its cost, splitting it when over the limit, retrying)."""
    final = raw_dir / req.target
    client = get_client()
    try:
        estimate = _estimate(client, req)
    except Exception as exc:  # 401/403 surface here first: same messages as on submit
        mapped = _classify(exc, req, config)
        if isinstance(mapped, CDSError):
            raise mapped from exc
        estimate = None  # transient trouble on the advisory estimate: just submit
    if estimate is not None and estimate[0] > estimate[1]:
        parts = _split(req) if depth < 8 else None
        if parts is None:
            warnings.warn(
                f"{req.summary}: estimated cost {estimate[0]:g} exceeds the limit "
                f"{estimate[1]:g} and the request cannot be split further; submitting anyway.",
                stacklevel=2,
            )
        else:
            LOG.warning(
                "%s: estimated cost %g > limit %g: splitting into %d parts",
                req.summary, estimate[0], estimate[1], len(parts),
            )
            paths = [_fetch_request(p, raw_dir, config, get_client, depth + 1) for p in parts]
            if _kind(paths[0]) != "netcdf":
                raise CDSError(f"{req.summary}: split parts are not netCDF; cannot merge them")
            _merge_parts(paths, final)
            why = check_file(final, req)
            if why is not None:
                raise CDSError(f"{req.summary}: merged parts are incomplete ({why})")
            for p in paths:
                p.unlink(missing_ok=True)
            return final

    s = _client_settings(config)
    last: BaseException | None = None
    for attempt in range(s["retries"] + 1):
        try:
            _download_one(client, req, final)
            return final
        except Exception as exc:  # mapped just below
            mapped = _classify(exc, req, config)
            if isinstance(mapped, CDSError):
                raise mapped from exc
            last = mapped
            if attempt < s["retries"]:
                wait_s = s["retry_wait_s"] * 2**attempt
                LOG.warning(
                    "%s: %s; resubmitting in %.3g s (attempt %d of %d)",
                    req.summary, mapped, wait_s, attempt + 2, s["retries"] + 1,
                )
                time.sleep(wait_s)
    if isinstance(last, _Damaged):
        raise CDSError(
            f"Giving up on {req.summary} after {s['retries'] + 1} attempts: every answer was a "
            f"damaged download ({last}); nothing was kept. The CDS may be serving a broken "
            f"file: re-run later (completed files are kept and skipped) or report it to the CDS."
        )
    raise CDSError(
        f"Giving up on {req.summary} after {s['retries'] + 1} attempts: {last}. The service may "
        f"be overloaded: re-run later (completed files are kept and skipped) or raise "
        f"era5.retries / era5.retry_wait_s."
    )


def _run_all(
    requests_: list[Request],
    raw_dir: Path,
    config: Mapping[str, Any],
    factory: Callable[[str, str], Any],
    url: str,
    key: str,
    max_parallel: int,
    progress: bool,
) -> None:
    local = threading.local()

    def get_client() -> Any:
        # requests.Session is not thread-safe: one client per worker thread
        if getattr(local, "client", None) is None:
            local.client = factory(url, key)
        return local.client

    from tqdm.auto import tqdm

    errors: list[BaseException] = []
    with (
        ThreadPoolExecutor(max_workers=max(1, max_parallel)) as pool,
        tqdm(total=len(requests_), desc="CDS requests", unit="req", disable=not progress) as bar,
    ):
        pending: set[Future[Path]] = {
            pool.submit(_fetch_request, r, raw_dir, config, get_client) for r in requests_
        }
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                exc = fut.exception()
                if exc is None:
                    bar.update(1)
                else:
                    errors.append(exc)
            if errors:
                # one fatal error (bad key, licence) would repeat for every request: stop early
                for fut in pending:
                    fut.cancel()
                wait(pending)
                for fut in pending:
                    if not fut.cancelled() and fut.exception() is not None:
                        errors.append(fut.exception())  # type: ignore[arg-type]
                break
    if errors:
        first = errors[0]
        more = f"\n({len(errors) - 1} other request(s) failed too.)" if len(errors) > 1 else ""
        if isinstance(first, CDSError):
            raise CDSError(f"{first}{more}") from first
        raise CDSError(f"CDS download failed: {type(first).__name__}: {first}{more}") from first


def fetch(
    requests: list[Request],
    raw_dir: Path,
    config: dict,
    client_factory: Callable[[str, str], Any] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Download every request under `raw_dir`, a few at a time, skipping complete valid files.

    Credentials are checked before anything is sent. Existing files are opened and checked for
    the expected variables and time steps; invalid ones are fetched again. `client_factory(url,
    key)` must return a real cdsapi client (default: `make_client` with config era5.retries and
    era5.retry_wait_s). Returns the landed paths in the order of `requests`.
    """
    raw_dir = Path(raw_dir)
    url, key = check_credentials()
    todo: list[Request] = []
    for req in requests:
        path = raw_dir / req.target
        if path.exists():
            why = check_file(path, req)
            if why is None:
                continue
            LOG.warning("%s: existing %s is invalid (%s): fetching again", req.summary, path, why)
            path.unlink()
        todo.append(req)
    if todo:
        s = _client_settings(config)
        factory = client_factory or _default_factory(config, "era5")
        _run_all(todo, raw_dir, config, factory, url, key, s["max_parallel"], progress)
    return [raw_dir / r.target for r in requests]


# ---------------------------------------------------------------------------------------------
# CMIP6 through the CDS (projections-cmip6)


def request_area(region: Mapping[str, float] | None) -> list[float] | None:
    """A region as the CDS `area` key: [north, west, south, east] (None: the whole globe)."""
    if not region:
        return None
    return [float(region["north"]), float(region["west"]), float(region["south"]),
            float(region["east"])]
