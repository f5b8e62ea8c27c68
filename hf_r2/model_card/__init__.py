"""The model card of an hf-r2 model folder: Hub metadata (`library_name`, tags, datasets, base model, license, the
measured accuracy as model-index `eval_results`) plus a body with the results and what each was measured on, the data,
the R2 settings, the per-layer weight ranges, how to load the model, how to deploy the files `hf-r2 export` wrote
(ONNX, Core ML), the license and the citation.

Only numbers measured and saved in the folder (`eval_results.json` / `all_results.json`, as
`Trainer.save_metrics("eval", ...)` writes them; `low_bit_results.json`; `export_results.json`, as `hf-r2 export`
writes it) or passed explicitly go on the card. The modules: `card` (metadata and assembly), `measured` (what each
number was measured on; Results and Data), `sections` (R2 settings, weight ranges, training, loading, license),
`deploy` (the exported files).
"""

from .card import MODEL_CARD_TAGS as MODEL_CARD_TAGS
from .card import R2_CITATION as R2_CITATION
from .card import build_model_card as build_model_card
from .card import folder_library as folder_library
from .card import model_license as model_license
from .card import write_model_card as write_model_card
from .deploy import EXPORT_RESULTS_NAME as EXPORT_RESULTS_NAME
from .deploy import read_export_results as read_export_results
from .deploy import weights_digest as weights_digest
from .measured import read_measured_accuracy as read_measured_accuracy

__all__ = ["EXPORT_RESULTS_NAME", "MODEL_CARD_TAGS", "R2_CITATION", "build_model_card", "folder_library",
           "model_license", "read_export_results", "read_measured_accuracy", "weights_digest", "write_model_card"]
