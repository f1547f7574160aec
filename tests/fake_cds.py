"""A fake Climate Data Store on 127.0.0.1 that the REAL cdsapi / ecmwf-datastores client talks to.

It implements the endpoints the client calls (catalogue messages, process, execution, job
polling, results, HEAD/GET of the asset, costing) and answers with small real netCDF files built
from the request, in the new-CDS layout: `valid_time`, latitude descending, longitude 0..360
when global (or with `lon360`), `number` and `expver` coordinates, ERA5 short names and units,
and a zip (one member per stepType) when a request mixes step types. Failure scenarios are
switched per test through `FakeCDS.scenario`.

Use it through the `fake_cds` fixture (import it into a test module or a conftest):

    from fake_cds import fake_cds  # noqa: F401

    def test_x(fake_cds):            # CDSAPI_URL / CDSAPI_KEY already point at the server
        fake_cds.scenario.statuses = ["accepted", "running", "successful"]
        ...
        assert fake_cds.count("POST", "/execution") == 2
"""

from __future__ import annotations

import io
import itertools
import json
import tempfile
import threading
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from downscaler.sources.cds import NETCDF_LOCK

G0 = 9.80665
# ERA5 long name -> (netCDF short name, stepType, units as the CDS writes them)
SINGLE = {
    "2m_temperature": ("t2m", "instant", "K"),
    "10m_u_component_of_wind": ("u10", "instant", "m s**-1"),
    "10m_v_component_of_wind": ("v10", "instant", "m s**-1"),
    "total_precipitation": ("tp", "accum", "m"),
    "minimum_2m_temperature_since_previous_post_processing": ("mn2t", "min", "K"),
    "maximum_2m_temperature_since_previous_post_processing": ("mx2t", "max", "K"),
    "geopotential": ("z", "instant", "m**2 s**-2"),
    "land_sea_mask": ("lsm", "instant", "(0 - 1)"),
}
PRESSURE = {
    "temperature": ("t", "K"),
    "u_component_of_wind": ("u", "m s**-1"),
    "v_component_of_wind": ("v", "m s**-1"),
    "geopotential": ("z", "m**2 s**-2"),
    "specific_humidity": ("q", "kg kg**-1"),
}
CMIP6 = {
    "near_surface_air_temperature": ("tas", "K"),
    "precipitation": ("pr", "kg m-2 s-1"),
    "eastward_near_surface_wind": ("uas", "m s-1"),
    "northward_near_surface_wind": ("vas", "m s-1"),
    "daily_minimum_near_surface_air_temperature": ("tasmin", "K"),
    "daily_maximum_near_surface_air_temperature": ("tasmax", "K"),
}


def t2m_value(lat: Any, lon: Any, hour: Any, day: Any) -> Any:
    """The fake 2 m temperature (K); tests recompute expected aggregates from it."""
    return 273.15 + 0.1 * lat + 0.01 * lon + hour + 0.5 * day


def tp_value(hour: Any, day: Any) -> Any:
    """The fake hourly precipitation (m, accumulated over the hour ending at valid_time)."""
    return 1e-4 * (hour + 1) * day


@dataclass
class Scenario:
    """What the fake service does; tests flip these fields."""

    statuses: list[str] = field(default_factory=lambda: ["successful"])  # successive polls
    unauthorized: bool = False  # 401 on every /retrieve call
    forbid: str | None = None  # "cost" or "licence": 403 on submit
    fail_job: bool = False  # job ends "failed"; /results answers 400 with title + traceback
    transient_500: int = 0  # this many 500s on POST .../execution before accepting
    truncate: int = 0  # this many asset GETs send half the bytes under a full Content-Length
    size_lie: int = 0  # advertise file:size this many bytes larger than the file (every time)
    damaged: int = 0  # this many jobs answer a netCDF cut in half, advertised at its cut size
    cost_limit: float = 1e12  # costing limit (cost = number of fields)
    wrong_variable: bool = False  # answer renames the first variable
    not_netcdf: bool = False  # answer is an HTML page
    lon360: bool = False  # longitudes 0..360 even with an area


@dataclass
class Job:
    id: str
    dataset: str
    request: dict[str, Any]
    polls: int = 0
    payload: bytes | None = None
    content_type: str = "application/netcdf"
    ext: str = "nc"


class FakeCDS:
    """The server: start(), .url, .key, .scenario, .log of (method, path), stop()."""

    def __init__(self) -> None:
        self.key = str(uuid.UUID(int=0x1234, version=4))
        self.scenario = Scenario()
        self.log: list[tuple[str, str]] = []
        self.submitted: list[tuple[str, dict[str, Any]]] = []
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> FakeCDS:
        server = self

        class Handler(_Handler):
            fake = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def base(self) -> str:
        assert self._httpd is not None, "start() the server first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def url(self) -> str:
        return f"{self.base}/api"

    def write_rc(self, path: Path) -> Path:
        """Write a .cdsapirc pointing at this server (use with CDSAPI_RC or HOME)."""
        path.write_text(f"url: {self.url}\nkey: {self.key}\n")
        return path

    # -- inspection ------------------------------------------------------------------------
    def count(self, method: str, path_part: str = "") -> int:
        """How many `method` requests reached the server with `path_part` in their path."""
        with self.lock:
            return sum(1 for m, p in self.log if m == method and path_part in p)

    # -- payloads --------------------------------------------------------------------------
    def payload(self, job: Job) -> tuple[bytes, str, str]:
        if job.payload is None:
            if self.scenario.not_netcdf:
                job.payload, job.content_type, job.ext = (
                    b"<html><body>Service temporarily unavailable</body></html>", "text/html",
                    "html")
            elif job.dataset == "projections-cmip6":
                job.payload, job.content_type, job.ext = (
                    cmip6_zip(job.request), "application/zip", "zip")
            else:
                job.payload, job.content_type, job.ext = era5_answer(
                    job.dataset, job.request, self.scenario)
                with self.lock:
                    if self.scenario.damaged > 0:
                        self.scenario.damaged -= 1
                        job.payload = job.payload[: len(job.payload) // 2]
        return job.payload, job.content_type, job.ext


def _as_list(v: Any) -> list[str]:
    return [str(x) for x in (v if isinstance(v, list | tuple) else [v])]


def _grid(request: dict[str, Any], lon360: bool) -> tuple[np.ndarray, np.ndarray]:
    g = float(_as_list(request.get("grid", [0.25]))[0])
    if "area" in request:
        n, w, s, e = (float(x) for x in request["area"])
        lat = np.round(np.arange(n, s - g / 2, -g), 6)
        lon = np.round(np.arange(w, e + g / 2, g), 6)
        if lon360:
            lon = lon % 360.0
    else:
        lat = np.round(np.arange(90.0, -90.0 - g / 2, -g), 6)
        lon = np.round(np.arange(0.0, 360.0 - g / 2, g), 6)
    return lat, lon


def _times(request: dict[str, Any]) -> pd.DatetimeIndex:
    out = []
    for y, m, d, t in itertools.product(*(_as_list(request[k]) for k in
                                          ("year", "month", "day", "time"))):
        try:
            out.append(pd.Timestamp(f"{int(y):04d}-{int(m):02d}-{int(d):02d}T{t[:5]}"))
        except ValueError:
            continue  # 31 February: the CDS skips it
    return pd.DatetimeIndex(sorted(out))


def _to_bytes(ds: xr.Dataset) -> bytes:
    # the client validates files in threads of this same process: share its netCDF lock
    with NETCDF_LOCK, tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.nc"
        ds.to_netcdf(p, engine="netcdf4",
                     encoding={"valid_time": {"units": "seconds since 1970-01-01",
                                              "dtype": "int64"}} if "valid_time" in ds else None)
        return p.read_bytes()


def era5_answer(dataset: str, request: dict[str, Any], sc: Scenario) -> tuple[bytes, str, str]:
    """Build the CDS answer: one netCDF, or a zip of one netCDF per stepType when mixed."""
    lat, lon = _grid(request, sc.lon360)
    times = _times(request)
    hour = times.hour.values[:, None, None]
    day = times.day.values[:, None, None]
    la, lo = lat[None, :, None], lon[None, None, :]
    signed_lon = ((lo + 180) % 360) - 180
    shape = (len(times), len(lat), len(lon))
    coords = {
        "valid_time": times.values,
        "latitude": ("latitude", lat, {"units": "degrees_north"}),
        "longitude": ("longitude", lon, {"units": "degrees_east"}),
        "number": 0,
        "expver": ("valid_time", np.array(["0001"] * len(times))),
    }
    by_step: dict[str, dict[str, Any]] = {}
    if dataset == "reanalysis-era5-pressure-levels":
        levels = np.array([int(x) for x in _as_list(request["pressure_level"])])
        coords["pressure_level"] = ("pressure_level", levels.astype("float64"),
                                    {"units": "hPa"})
        for name in _as_list(request["variable"]):
            short, units = PRESSURE[name]
            base = t2m_value(la, signed_lon, hour, day)[:, None] - 0.05 * (1000 - levels)[
                None, :, None, None]
            data = np.broadcast_to(base, (len(times), len(levels), len(lat), len(lon)))
            by_step.setdefault("instant", {})[short] = xr.Variable(
                ("valid_time", "pressure_level", "latitude", "longitude"),
                data.astype("float32"), {"units": units, "GRIB_stepType": "instant"})
    else:
        for name in _as_list(request["variable"]):
            short, step, units = SINGLE[name]
            t2m = t2m_value(la, signed_lon, hour, day)
            data = {
                "t2m": t2m, "u10": 5.0 + 0 * t2m, "v10": -3.0 + 0 * t2m,
                "tp": tp_value(hour, day) + 0 * la * lo, "mn2t": t2m - 1.0, "mx2t": t2m + 1.0,
                "z": G0 * 10.0 * la + 0 * hour * lo,
                "lsm": (signed_lon > 0).astype(float) + 0 * hour * la,
            }[short]
            by_step.setdefault(step, {})[short] = xr.Variable(
                ("valid_time", "latitude", "longitude"),
                np.broadcast_to(data, shape).astype("float32"),
                {"units": units, "GRIB_stepType": step})
    if sc.wrong_variable:
        step0 = next(iter(by_step))
        first = next(iter(by_step[step0]))
        by_step[step0]["xyz"] = by_step[step0].pop(first)
    dss = {step: xr.Dataset(v, coords=coords, attrs={"GRIB_centre": "ecmf",
                                                      "institution": "ECMWF (fake)"})
           for step, v in by_step.items()}
    if len(dss) == 1:
        return _to_bytes(next(iter(dss.values()))), "application/netcdf", "nc"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for step, ds in dss.items():
            zf.writestr(f"data_stream-oper_stepType-{step}.nc", _to_bytes(ds))
    return buf.getvalue(), "application/zip", "zip"


def cmip6_zip(request: dict[str, Any]) -> bytes:
    """A projections-cmip6 answer: zip of one daily noleap netCDF + a provenance JSON."""
    short, units = CMIP6[str(_as_list(request["variable"])[0])]
    years = [int(y) for y in _as_list(request["year"])]
    months = [int(m) for m in _as_list(request.get("month", [str(i) for i in range(1, 13)]))]
    import cftime

    times = [cftime.DatetimeNoLeap(y, m, d) for y in years for m in months
             for d in range(1, [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][m - 1] + 1)]
    lat = np.array([-1.0, 1.0])
    lon = np.array([0.0, 1.25])
    ds = xr.Dataset(
        {short: (("time", "lat", "lon"), np.full((len(times), 2, 2), 280.0, "float32"),
                 {"units": units})},
        coords={"time": times, "lat": lat, "lon": lon},
    )
    model = str(request["model"]).upper().replace("_", "-")
    exp = str(request["experiment"]).replace("_", "")
    name = f"{short}_day_{model}_{exp}_r1i1p1f1_gn_{years[0]}0101-{years[-1]}1231.nc"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(name, _to_bytes(ds))
        zf.writestr("provenance_fake.json", json.dumps({"request": request}))
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeCDS
    protocol_version = "HTTP/1.0"  # one request per connection: truncation ends with a close

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    # -- helpers ---------------------------------------------------------------------------
    def _json(self, code: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _record(self) -> tuple[str, dict[str, list[str]]]:
        parsed = urlparse(self.path)
        with self.fake.lock:
            self.fake.log.append((self.command, parsed.path))
        return parsed.path, parse_qs(parsed.query)

    def _auth_ok(self, path: str) -> bool:
        if not path.startswith("/api/retrieve"):
            return True
        if self.fake.scenario.unauthorized or self.headers.get("PRIVATE-TOKEN") != self.fake.key:
            self._json(401, {"type": "authentication error", "title": "Authentication failed",
                             "status": 401,
                             "detail": "The provided personal access token is not valid"})
            return False
        return True

    def _job_json(self, job: Job, status: str) -> dict[str, Any]:
        url = f"{self.fake.url}/retrieve/v1/jobs/{job.id}"
        return {
            "processID": job.dataset, "type": "process", "jobID": job.id, "status": status,
            "created": "2025-01-01T00:00:00", "updated": "2025-01-01T00:00:01",
            "metadata": {"log": [], "request": {"ids": job.request}},
            "links": [{"href": url, "rel": "self", "type": "application/json"},
                      {"href": f"{url}/results", "rel": "results"}],
        }

    def _status(self, job: Job, advance: bool) -> str:
        sc = self.fake.scenario
        seq = list(sc.statuses) or ["successful"]
        with self.fake.lock:
            i = min(job.polls, len(seq) - 1)
            if advance:
                job.polls += 1
        status = seq[i]
        if status == "successful" and sc.fail_job:
            status = "failed"
        return status

    # -- verbs -----------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        path, query = self._record()
        if path == "/api/catalogue/v1/messages":
            return self._json(200, {"messages": []})
        if path.startswith("/download/"):
            return self._asset(path)
        if not self._auth_ok(path):
            return
        parts = path.strip("/").split("/")
        if parts[:3] == ["api", "retrieve", "v1"] and parts[3:4] == ["processes"]:
            return self._json(200, {"id": parts[4], "title": parts[4], "links": []})
        if parts[:4] == ["api", "retrieve", "v1", "jobs"] and len(parts) >= 5:
            job = self.fake.jobs.get(parts[4])
            if job is None:
                return self._json(404, {"title": "job not found"})
            if len(parts) == 6 and parts[5] == "results":
                return self._results(job)
            return self._json(200, self._job_json(job, self._status(job, "log" in query)))
        return self._json(404, {"title": f"no route {path}"})

    def do_HEAD(self) -> None:  # noqa: N802
        path, _ = self._record()
        if path.startswith("/download/"):
            return self._asset(path)
        return self._json(404, {"title": "no route"})

    def do_POST(self) -> None:  # noqa: N802
        path, _ = self._record()
        if not self._auth_ok(path):
            return
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        inputs = body.get("inputs", {})
        parts = path.strip("/").split("/")
        if parts[:4] != ["api", "retrieve", "v1", "processes"] or len(parts) != 6:
            return self._json(404, {"title": f"no route {path}"})
        dataset, action = parts[4], parts[5]
        sc = self.fake.scenario
        if action == "costing":
            return self._json(200, {"id": "size", "cost": float(_fields(inputs)),
                                    "limit": float(sc.cost_limit)})
        if action != "execution":
            return self._json(404, {"title": f"no route {path}"})
        with self.fake.lock:
            if sc.transient_500 > 0:
                sc.transient_500 -= 1
                fail500 = True
            else:
                fail500 = False
        if fail500:
            return self._json(500, {"title": "Internal Server Error"})
        if sc.forbid == "cost":
            return self._json(403, {"title": "cost limits exceeded",
                                    "detail": "Your request is too large, please reduce your "
                                              "selection."})
        if sc.forbid == "licence":
            return self._json(403, {
                "title": "required licences not accepted",
                "detail": "Not all the required licences have been accepted; please visit "
                          f"https://cds.climate.copernicus.eu/datasets/{dataset}"
                          "?tab=download#manage-licences to accept the required licence(s)."})
        job = Job(id=str(uuid.uuid4()), dataset=dataset, request=inputs)
        with self.fake.lock:
            self.fake.jobs[job.id] = job
            self.fake.submitted.append((dataset, inputs))
        out = self._job_json(job, "accepted")
        out["links"] = [{"href": f"{self.fake.url}/retrieve/v1/jobs/{job.id}", "rel": "monitor"}]
        return self._json(201, out)

    def _results(self, job: Job) -> None:
        if self._status(job, False) == "failed":
            return self._json(400, {
                "type": "job execution error", "title": "The job has failed",
                "status": 400,
                "traceback": "MARS returned no data: check the request keys (fake traceback)"})
        data, ctype, ext = self.fake.payload(job)
        return self._json(200, {"asset": {"value": {
            "type": ctype, "href": f"{self.fake.base}/download/{job.id}.{ext}",
            "file:size": len(data) + self.fake.scenario.size_lie,
            "file:checksum": "0", "file:local_path": f"s3://fake/{job.id}.{ext}"}}})

    def _asset(self, path: str) -> None:
        job = self.fake.jobs.get(Path(path).stem)
        if job is None:
            return self._json(404, {"title": "asset not found"})
        data, ctype, _ = self.fake.payload(job)
        cut = False
        if self.command == "GET":
            with self.fake.lock:
                if self.fake.scenario.truncate > 0:
                    self.fake.scenario.truncate -= 1
                    cut = True
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data[: len(data) // 2] if cut else data)
            self.wfile.flush()
            if cut:
                self.close_connection = True


def _fields(request: dict[str, Any]) -> int:
    n = len(_as_list(request.get("variable", [])))
    if all(k in request for k in ("year", "month", "day")):
        n *= max(1, len(_times({**{"time": ["00:00"]}, **request})))
    return n * len(_as_list(request.get("pressure_level", ["-"])))


@pytest.fixture
def fake_cds(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCDS]:
    """A running fake CDS; CDSAPI_URL/CDSAPI_KEY point at it (CDSAPI_RC unset)."""
    server = FakeCDS().start()
    monkeypatch.setenv("CDSAPI_URL", server.url)
    monkeypatch.setenv("CDSAPI_KEY", server.key)
    monkeypatch.delenv("CDSAPI_RC", raising=False)
    try:
        yield server
    finally:
        server.stop()
