"""The repository templates of the toy suite, and their split: no template is in both splits."""

from ..model import Template
from . import dateranges, geometry, inventory, ledger, matrix, textutils

__all__ = ["HELDOUT_TEMPLATES", "TEMPLATES", "TRAIN_TEMPLATES"]

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (inventory.TEMPLATE, textutils.TEMPLATE, ledger.TEMPLATE, matrix.TEMPLATE,
              geometry.TEMPLATE, dateranges.TEMPLATE)
}
TRAIN_TEMPLATES: tuple[str, ...] = ("inventory", "textutils", "ledger", "matrix")
HELDOUT_TEMPLATES: tuple[str, ...] = ("geometry", "dateranges")
