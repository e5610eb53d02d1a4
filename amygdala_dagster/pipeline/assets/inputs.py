"""What a run forwards, read from the stored artefacts and the evaluation settings (shared by the GPU steps)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from amygdala_dagster.engine.inputs import read_inputs
from amygdala_dagster.evaluation.generalisation import read_snippets
from amygdala_dagster.examples.selection import ExampleSet, holdout_texts
from amygdala_dagster.pipeline.assets.graph import read_snapshot_from
from amygdala_dagster.pipeline.resources import ArtifactStorage, EvaluationResource, SelectionResource
from amygdala_dagster.workflow.partitions import collect_texts
from amygdala_dagster.workflow.samples import RunSamples, calibration_sample, conversation_sample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def run_inputs(sets: Mapping[str, ExampleSet], storage: ArtifactStorage, selection: SelectionResource,
               evaluation: EvaluationResource, tokenizer: PreTrainedTokenizerBase, max_tokens: int
               ) -> tuple[list[str], list[str], RunSamples]:
    """What a run forwards: every example text of ``sets`` and every snippet (pooled), and the per-token
    samples (calibration texts under the token budget; the labelled evaluation conversations)."""
    texts, keys = collect_texts(sets)
    snippets_path = evaluation.snippets_path()
    for s in read_snippets(snippets_path) if snippets_path else []:
        texts.append(s["text"])
        keys.append(f"snippet {s['id']}")
    budget = int(evaluation.calibration_tokens)
    path = evaluation.calibration_texts
    if path:
        calibration = calibration_sample(tokenizer, max_tokens, budget, records=read_inputs(path),
                                         records_name=path.rsplit("/", 1)[-1])
    else:
        calibration = calibration_sample(tokenizer, max_tokens, budget,
                                         holdout=holdout_texts(read_snapshot_from(storage), selection.params()))
    conv_path = evaluation.eval_conversations_path()
    conversations = conversation_sample(tokenizer, max_tokens, read_inputs(conv_path, labelled=True),
                                        conv_path.rsplit("/", 1)[-1], budget) if conv_path else None
    return texts, keys, RunSamples(calibration, conversations)
