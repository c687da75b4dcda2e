"""Where the package finds its Hydra configs and embedded assets."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
# conf/ sits beside the package in a checkout (installed editable by `make install`).
CONF_DIR = PACKAGE_DIR.parent / "conf"


def group_options(group: str) -> list[str]:
    """The options of a Hydra config group: the yaml stems under conf/<group>/."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
