"""Text for calibration and evaluation: small, offline, replaceable.

Every source yields ``(title, text)`` documents; :func:`split_documents` splits them by
document and :func:`token_blocks` turns texts into fixed-length token blocks, so adding a
domain means adding one function that returns documents.
"""

from flextron_fx.data.blocks import calibration_and_heldout, split_documents, token_blocks
from flextron_fx.data.wikipedia import wikipedia_articles, wikitext_to_plain

__all__ = [
    "calibration_and_heldout",
    "split_documents",
    "token_blocks",
    "wikipedia_articles",
    "wikitext_to_plain",
]
