"""The canonical variables: config (ERA5 long) names, file (short) names, units, normalisation.

Every source writes these short names and units, so later stages never know where data came
from. Config files use the long ERA5 names; files use the short ones.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variable:
    long_name: str  # ERA5 name used in config.yaml
    short_name: str  # name inside every file the workflow writes
    units: str
    standard_name: str  # CF standard name
    transform: str  # normalisation: "zscore" or "log1p" (then z-score)


VARIABLES: dict[str, Variable] = {
    v.long_name: v
    for v in [
        Variable("2m_temperature", "t2m", "K", "air_temperature", "zscore"),
        Variable("total_precipitation", "tp", "mm/day", "lwe_precipitation_rate", "log1p"),
        Variable("10m_u_component_of_wind", "u10", "m/s", "eastward_wind", "zscore"),
        Variable("10m_v_component_of_wind", "v10", "m/s", "northward_wind", "zscore"),
        Variable(
            "minimum_2m_temperature_since_previous_post_processing",
            "mn2t", "K", "air_temperature", "zscore",
        ),
        Variable(
            "maximum_2m_temperature_since_previous_post_processing",
            "mx2t", "K", "air_temperature", "zscore",
        ),
    ]
}

STATICS: dict[str, Variable] = {
    v.long_name: v
    for v in [
        Variable("orography", "orog", "m", "surface_altitude", "zscore"),
        Variable("land_sea_mask", "lsm", "1", "land_binary_mask", "zscore"),
        Variable("latitude", "latitude", "degrees_north", "latitude", "zscore"),
    ]
}

BY_SHORT_NAME: dict[str, Variable] = {
    v.short_name: v for v in [*VARIABLES.values(), *STATICS.values()]
}


def short_names(long_names: list[str]) -> list[str]:
    """Map config (long) names to file (short) names, naming the valid choices on a typo."""
    table = {**VARIABLES, **STATICS}
    unknown = [n for n in long_names if n not in table]
    if unknown:
        raise KeyError(f"unknown variable(s) {unknown}; valid choices: {sorted(table)}")
    return [table[n].short_name for n in long_names]
