"""CMIP6: ESGF DRS layout, calendars, units, and intake-esgf with only its HTTP call stubbed."""

from __future__ import annotations

from pathlib import Path

import cftime
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from downscaler.sources.canonical import split_statics
from downscaler.sources.cmip6 import esgf_path, find_local_cmip6, open_cmip6, search_esgf

LAT = np.array([-10.0, 0.0, 10.0])
LON = np.array([0.0, 120.0, 240.0])  # CMIP6 grids run 0..360


def write_cmip6(root: Path, source: str, variable: str, table: str, calendar: str,
                start: tuple[int, int, int], days: int, units: str, version: str = "20190429",
                scale: float = 1.0) -> Path:
    """Write one daily CMIP6 file in the DRS layout: value = scale * (day index + 1), plus
    250 for temperatures in K (plausible values: the reader checks them)."""
    first = cftime.datetime(*start, 12, calendar=calendar)
    times = [first + pd.Timedelta(days=i).to_pytimedelta() for i in range(days)]
    t0, t1 = times[0], times[-1]
    time_range = f"{t0.year:04d}{t0.month:02d}{t0.day:02d}-{t1.year:04d}{t1.month:02d}{t1.day:02d}"
    path = esgf_path(root, "CMIP", "INST", source, "historical", "r1i1p1f1", table, variable,
                     "gn", version, time_range=time_range)
    offset = 250.0 if units == "K" else 0.0
    values = offset + scale * (np.arange(days, dtype="f8") + 1)[:, None, None] * np.ones((1, 3, 3))
    ds = xr.Dataset(
        {variable: (("time", "lat", "lon"), values.astype("f4"), {"units": units}),
         "time_bnds": (("time", "bnds"), np.zeros((days, 2)))},
        coords={"time": ("time", times), "lat": LAT, "lon": LON, "height": 2.0},
    )
    ds["time"].encoding.update(units="days since 1850-01-01", calendar=calendar)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(path)
    return path


def write_fx(root: Path, source: str, variable: str, units: str, value: float) -> Path:
    path = esgf_path(root, "CMIP", "INST", source, "historical", "r1i1p1f1", "fx", variable,
                     "gn", "20190429") / f"{variable}_fx_{source}_historical_r1i1p1f1_gn.nc"
    path.parent.mkdir(parents=True, exist_ok=True)
    xr.Dataset({variable: (("lat", "lon"), np.full((3, 3), value), {"units": units})},
               coords={"lat": LAT, "lon": LON}).to_netcdf(path)
    return path


def test_esgf_path_is_the_drs_layout(tmp_path):
    p = esgf_path(tmp_path, "CMIP", "NCAR", "CESM2", "historical", "r1i1p1f1", "day", "tas",
                  "gn", "20190308", time_range="20000101-20091231")
    assert p == tmp_path / (
        "CMIP6/CMIP/NCAR/CESM2/historical/r1i1p1f1/day/tas/gn/v20190308/"
        "tas_day_CESM2_historical_r1i1p1f1_gn_20000101-20091231.nc")
    assert esgf_path(tmp_path, "CMIP", "NCAR", "CESM2", "historical", "r1i1p1f1", "day",
                     "tas", "gn", "v20190308") == p.parent


def test_noleap_files_found_opened_and_aligned_by_date(tmp_path):
    # two files split across Feb 2000 (a Gregorian leap year) on a noleap calendar
    write_cmip6(tmp_path, "CanESM5", "tas", "day", "noleap", (2000, 2, 25), 4, "K")
    write_cmip6(tmp_path, "CanESM5", "tas", "day", "noleap", (2000, 3, 1), 3, "K", scale=10)
    # an older version must be ignored in favour of the latest
    write_cmip6(tmp_path, "CanESM5", "tas", "day", "noleap", (2000, 2, 25), 4, "K",
                version="20180101", scale=-1)
    write_fx(tmp_path, "CanESM5", "sftlf", "%", 40.0)

    found = find_local_cmip6(tmp_path, "CanESM5", "historical", "r1i1p1f1", "day",
                             ["2m_temperature", "land_sea_mask"])
    assert set(found) == {"tas", "sftlf"}
    assert len(found["tas"]) == 2 and all("v20190429" in str(p) for p in found["tas"])

    ds = open_cmip6(found, ["2m_temperature", "land_sea_mask"])
    fields, static = split_statics(ds)
    days = pd.DatetimeIndex(fields["time"].values)
    assert fields["time"].dtype == np.dtype("datetime64[ns]")
    # noleap has no Feb 29: it stays a gap, nothing is invented
    assert pd.Timestamp("2000-02-29T12") not in days
    assert list(days.strftime("%m-%d")) == ["02-25", "02-26", "02-27", "02-28", "03-01",
                                            "03-02", "03-03"]
    t2m = fields["t2m"].isel(lat=0, lon=0).values
    # values stay on their dates
    np.testing.assert_allclose(t2m, 250 + np.array([1, 2, 3, 4, 10, 20, 30]))
    assert fields["t2m"].attrs["units"] == "K"
    assert list(fields["lon"].values) == [-120.0, 0.0, 120.0]
    assert "height" not in fields.variables and "time_bnds" not in fields.variables
    np.testing.assert_allclose(static["lsm"].values, 0.4)


def test_360_day_precipitation(tmp_path):
    # 360_day: Jan 29 .. Mar 2 of model year 2001 = 34 days, with Feb 29 and Feb 30
    write_cmip6(tmp_path, "UKESM1-0-LL", "pr", "day", "360_day", (2001, 1, 29), 34,
                "kg m-2 s-1", scale=1e-5)
    found = find_local_cmip6(tmp_path, "UKESM1-0-LL", "historical", "r1i1p1f1", "day", ["pr"])
    ds = open_cmip6(found, ["total_precipitation"])
    days = pd.DatetimeIndex(ds["time"].values)
    # Feb 29 / Feb 30 do not exist in 2001 and are dropped; Jan 31 never existed in the model
    assert len(days) == 34 - 2
    assert pd.Timestamp("2001-01-31T12") not in days
    assert days[0] == pd.Timestamp("2001-01-29T12") and days[-1] == pd.Timestamp("2001-03-02T12")
    tp = ds["tp"].isel(lat=1, lon=1).to_series()
    # model day index i (value 1e-5 * (i+1) kg m-2 s-1) -> x 86400 mm/day, on the same date
    assert tp[pd.Timestamp("2001-01-29T12")] == pytest.approx(1e-5 * 1 * 86400, rel=1e-6)
    assert tp[pd.Timestamp("2001-02-01T12")] == pytest.approx(1e-5 * 3 * 86400, rel=1e-6)
    assert tp[pd.Timestamp("2001-03-01T12")] == pytest.approx(1e-5 * 33 * 86400, rel=1e-6)
    assert ds["tp"].attrs["units"] == "mm/day"


def test_period_selects_dates_and_skips_files_outside_it(tmp_path):
    write_cmip6(tmp_path, "CanESM5", "tas", "day", "noleap", (2000, 1, 1), 10, "K")
    # a damaged file outside the period: proves it is never opened
    bad = esgf_path(tmp_path, "CMIP", "INST", "CanESM5", "historical", "r1i1p1f1", "day",
                    "tas", "gn", "20190429", time_range="20100101-20101231")
    bad.write_text("not netcdf")
    found = find_local_cmip6(tmp_path, "CanESM5", "historical", "r1i1p1f1", "day", ["tas"])
    assert len(found["tas"]) == 2
    ds = open_cmip6(found, ["tas"], period={"start": "2000-01-03", "end": "2000-01-05"})
    assert list(pd.DatetimeIndex(ds["time"].values).day) == [3, 4, 5]
    with pytest.raises(ValueError, match="1999-01-01"):
        open_cmip6(found["tas"][:1], ["tas"], period={"start": "1999-01-01",
                                                      "end": "1999-01-31"})


def test_missing_variable_names_the_pattern(tmp_path):
    write_cmip6(tmp_path, "CanESM5", "tas", "day", "noleap", (2000, 1, 1), 2, "K")
    with pytest.raises(FileNotFoundError, match=r"uas.*CanESM5.*search_esgf"):
        find_local_cmip6(tmp_path, "CanESM5", "historical", "r1i1p1f1", "day", ["uas"])


# --- intake-esgf, with only the Globus Search HTTP POST replaced --------------------------


class FakeGlobusIndex:
    """Answers Globus Search scroll queries the way the ESGF2 index does (records as JSON)."""

    def __init__(self, records: list[dict]):
        self.records = records
        self.queries: list[dict] = []

    def post(self, client, path, *, data=None, **kwargs):
        assert "/scroll" in path, path  # the only call intake-esgf's search makes
        filters = {f["field_name"]: f["values"] for f in data.get("filters", [])}
        self.queries.append(filters)
        hits = []
        for rec in self.records:
            content = rec["content"]
            ok = True
            for field, values in filters.items():
                if field not in content:
                    continue
                have = content[field] if isinstance(content[field], list) else [content[field]]
                if not {str(v) for v in have} & {str(v) for v in values}:
                    ok = False
            if ok:
                hits.append({"subject": rec["subject"], "entries": [{"content": content}]})
        return {"total": len(hits), "gmeta": hits, "has_next_page": False}


def esgf_records(source: str, variable: str, table: str, files: list[Path]) -> list[dict]:
    facets = dict(mip_era="CMIP6", activity_drs="CMIP", institution_id="INST",
                  source_id=source, experiment_id="historical", member_id="r1i1p1f1",
                  table_id=table, variable_id=variable, grid_label="gn")
    master = ".".join(facets.values())
    dataset_id = f"{master}.v20190429|esgf-node.example.org"
    template = ("%(root)s/%(mip_era)s/%(activity_drs)s/%(institution_id)s/%(source_id)s/"
                "%(experiment_id)s/%(member_id)s/%(table_id)s/%(variable_id)s/%(grid_label)s/"
                "%(version)s")
    lists = {k: [v] for k, v in facets.items()}
    records = [{"subject": dataset_id, "content": {
        **lists, "project": ["CMIP6"], "version": "20190429", "data_node": "esgf-node.example.org",
        "type": "Dataset", "latest": True, "retracted": False}}]
    for f in files:
        records.append({"subject": f"{master}.v20190429.{f.name}|esgf-node.example.org",
                        "content": {
            **lists, "project": ["CMIP6"], "type": "File", "dataset_id": dataset_id,
            "title": f.name, "checksum_type": ["SHA256"], "checksum": ["0" * 64],
            "size": f.stat().st_size, "directory_format_template_": [template],
            "url": [f"https://esgf-node.example.org/thredds/fileServer/{f.name}"
                    "|application/netcdf|HTTPServer"]}})
    return records


@pytest.fixture
def isolated_intake_esgf(tmp_path, monkeypatch):
    import intake_esgf  # pinned in envs/requirements.txt

    monkeypatch.setitem(intake_esgf.conf, "download_db", str(tmp_path / "esgf" / "download.db"))
    monkeypatch.setitem(intake_esgf.conf, "logfile", str(tmp_path / "esgf" / "esgf.log"))
    monkeypatch.setitem(intake_esgf.conf, "esg_dataroot", [])
    monkeypatch.setitem(intake_esgf.conf, "requests_cache", {
        "expire_after": "DO_NOT_CACHE", "cache_name": str(tmp_path / "esgf" / "requests"),
        "use_cache_dir": False})
    return intake_esgf


def test_search_esgf_through_intake_esgf(tmp_path, monkeypatch, isolated_intake_esgf):
    import globus_sdk

    cache = tmp_path / "cache"
    tas = [write_cmip6(cache, "CanESM5", "tas", "day", "noleap", (2000, 1, 1), 3, "K"),
           write_cmip6(cache, "CanESM5", "tas", "day", "noleap", (2000, 1, 4), 3, "K")]
    orog = [write_fx(cache, "CanESM5", "orog", "m", 250.0)]
    index = FakeGlobusIndex(esgf_records("CanESM5", "tas", "day", tas)
                            + esgf_records("CanESM5", "orog", "fx", orog))

    def post(client, path, **kwargs):  # the HTTP boundary of globus_sdk's SearchClient
        return index.post(client, path, **kwargs)

    monkeypatch.setattr(globus_sdk.SearchClient, "post", post)
    found = search_esgf("CanESM5", "historical", "r1i1p1f1", "day",
                        ["2m_temperature", "orography"], cache=cache)
    assert found == {"tas": sorted(tas), "orog": orog}  # resolved in the cache, no download
    dataset_query = index.queries[0]
    assert dataset_query["source_id"] == ["CanESM5"] and dataset_query["variable_id"] == ["tas"]
    assert dataset_query["table_id"] == ["day"]

    fields, static = split_statics(open_cmip6(found, ["tas", "orog"]))
    assert fields.sizes["time"] == 6 and float(static["orog"].mean()) == 250.0

    index.records = []  # ESGF knows nothing of this model
    with pytest.raises(FileNotFoundError, match="ESGF has no CMIP6 dataset"):
        search_esgf("NoSuchModel", "historical", "r1i1p1f1", "day", ["tas"], cache=cache)


def test_missing_intake_esgf_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "intake_esgf", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install 'intake-esgf"):
        search_esgf("CanESM5", "historical", "r1i1p1f1", "day", ["tas"])
