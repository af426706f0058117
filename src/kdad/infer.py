"""Old home of batch inference over files: see kdad.deploy.batch."""

from kdad.deploy.batch import Row, common_base, expand_inputs, out_name, out_stems, stream_predictions, write_table

__all__ = ["Row", "common_base", "expand_inputs", "out_name", "out_stems", "stream_predictions", "write_table"]
