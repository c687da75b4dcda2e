"""Where the package finds its Hydra configs and embedded assets (both ship inside the package)."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
ASSETS_DIR = PACKAGE_DIR / "assets"
CONF_DIR = PACKAGE_DIR / "conf"


def group_options(group: str) -> list[str]:
    """The options of a Hydra config group: the yaml stems under compress_order/conf/<group>/."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
