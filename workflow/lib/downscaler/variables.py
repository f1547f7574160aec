"""The canonical variables: config (ERA5 long) names, file (short) names, units, normalisation.

Every source writes these short names and units, so later stages never know where data came
from. Config files use the long ERA5 names; files use the short ones. Pressure-level variables
are named `<ERA5 pressure-level name>@<hPa>` in the config (`temperature@850`) and
`<short><hPa>` in files (`t850`). Calendar features (`hour_sin`, ... ) are computed inputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Variable:
    long_name: str  # ERA5 name used in config.yaml
    short_name: str  # name inside every file the workflow writes
    units: str
    standard_name: str  # CF standard name
    transform: str  # normalisation: "zscore" or "log1p" (then z-score)
    # physically plausible range (inclusive) in `units`, checked while reading data
    valid_range: tuple[float, float] | None = None


VARIABLES: dict[str, Variable] = {
    v.long_name: v
    for v in [
        Variable("2m_temperature", "t2m", "K", "air_temperature", "zscore", (150.0, 350.0)),
        Variable("total_precipitation", "tp", "mm/day", "lwe_precipitation_rate", "log1p",
                 (0.0, 2000.0)),
        Variable("10m_u_component_of_wind", "u10", "m/s", "eastward_wind", "zscore",
                 (-150.0, 150.0)),
        Variable("10m_v_component_of_wind", "v10", "m/s", "northward_wind", "zscore",
                 (-150.0, 150.0)),
        Variable(
            "minimum_2m_temperature_since_previous_post_processing",
            "mn2t", "K", "air_temperature", "zscore", (150.0, 350.0),
        ),
        Variable(
            "maximum_2m_temperature_since_previous_post_processing",
            "mx2t", "K", "air_temperature", "zscore", (150.0, 350.0),
        ),
    ]
}

STATICS: dict[str, Variable] = {
    v.long_name: v
    for v in [
        Variable("orography", "orog", "m", "surface_altitude", "zscore", (-500.0, 9000.0)),
        Variable("land_sea_mask", "lsm", "1", "land_binary_mask", "zscore", (0.0, 1.0)),
        Variable("latitude", "latitude", "degrees_north", "latitude", "zscore"),
    ]
}

# ERA5 pressure-level variables: long name -> (short name, units, CF name, plausible range)
PRESSURE_LEVEL: dict[str, tuple[str, str, str, tuple[float, float]]] = {
    "temperature": ("t", "K", "air_temperature", (150.0, 350.0)),
    "u_component_of_wind": ("u", "m/s", "eastward_wind", (-250.0, 250.0)),
    "v_component_of_wind": ("v", "m/s", "northward_wind", (-250.0, 250.0)),
    "geopotential": ("z", "m2 s-2", "geopotential", (-10_000.0, 400_000.0)),
    "specific_humidity": ("q", "kg/kg", "specific_humidity", (0.0, 0.1)),
    "relative_humidity": ("r", "%", "relative_humidity", (0.0, 150.0)),
    "vertical_velocity": ("w", "Pa/s", "lagrangian_tendency_of_air_pressure", (-100.0, 100.0)),
}
PRESSURE_LEVELS_HPA = (1, 2, 3, 5, 7, 10, 20, 30, 50, 70, 100, 125, 150, 175, 200, 225, 250,
                       300, 350, 400, 450, 500, 550, 600, 650, 700, 750, 775, 800, 825, 850, 875,
                       900, 925, 950, 975, 1000)

# Calendar features (config inputs.calendar): sin/cos of the hour of day and of the day of year,
# the same value in every grid cell. Hour features only for hourly data.
CALENDAR: dict[str, Variable] = {
    name: Variable(name, name, "1", name, "zscore", (-1.0, 1.0))
    for name in ("hour_sin", "hour_cos", "doy_sin", "doy_cos")
}

_LEVEL_NAME = re.compile(r"^(?P<name>[a-z_]+)@(?P<level>\d+)$")
_LEVEL_SHORT = re.compile(r"^(?P<short>[a-z]+)(?P<level>\d+)$")
_SHORT_TO_PL = {short: long for long, (short, *_) in PRESSURE_LEVEL.items()}


def pressure_level(long_name: str) -> tuple[str, int] | None:
    """('temperature', 850) for 'temperature@850'; None for a single-level name."""
    match = _LEVEL_NAME.match(long_name)
    if not match or match["name"] not in PRESSURE_LEVEL:
        return None
    return match["name"], int(match["level"])


def _level_variable(long_name: str) -> Variable | None:
    parsed = pressure_level(long_name)
    if parsed is None:
        return None
    name, level = parsed
    short, units, standard, valid = PRESSURE_LEVEL[name]
    if f"{short}{level}" in {v.short_name for v in VARIABLES.values()}:
        return None  # u10/v10 are the 10 m winds; 10 hPa winds cannot share their file name
    return Variable(long_name, f"{short}{level}", units, standard, "zscore", valid)


def variable(long_name: str) -> Variable:
    """The Variable for a config name (single level, `name@hPa`, static or calendar feature)."""
    for table in (VARIABLES, STATICS, CALENDAR):
        if long_name in table:
            return table[long_name]
    found = _level_variable(long_name)
    if found is None:
        raise KeyError(f"unknown variable {long_name!r}; valid choices: {valid_names()}")
    return found


def valid_names() -> list[str]:
    """What a config may name: single-level variables, statics, and `name@hPa` forms."""
    return sorted(VARIABLES) + sorted(STATICS) + [f"{n}@<hPa>" for n in sorted(PRESSURE_LEVEL)]


class _ByShortName(dict):
    """Short name -> Variable; pressure-level short names (t850, z500) are built on demand."""

    def __missing__(self, key: str) -> Variable:
        match = _LEVEL_SHORT.match(str(key))
        if match and match["short"] in _SHORT_TO_PL:
            return _level_variable(f"{_SHORT_TO_PL[match['short']]}@{match['level']}")
        raise KeyError(key)

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default


BY_SHORT_NAME: dict[str, Variable] = _ByShortName(
    {v.short_name: v for v in [*VARIABLES.values(), *STATICS.values(), *CALENDAR.values()]}
)


def short_names(long_names: list[str]) -> list[str]:
    """Map config (long) names to file (short) names, naming the valid choices on a typo."""
    unknown = []
    out = []
    for name in long_names:
        try:
            out.append(variable(name).short_name)
        except KeyError:
            unknown.append(name)
    if unknown:
        raise KeyError(f"unknown variable(s) {unknown}; valid choices: {valid_names()}")
    return out


def calendar_names(frequency: str) -> list[str]:
    """The calendar features for a data frequency (hour of day only for hourly data)."""
    days = ["doy_sin", "doy_cos"]
    return ["hour_sin", "hour_cos", *days] if frequency == "hourly" else days
