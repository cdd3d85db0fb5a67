"""A model whose forward, with a train-only branch, is inherited (kept in its own file: the
train-mode detection reads class sources, which a class defined in a test body may lack)."""

from archs import TrainAuxNet


class InheritsTrainAux(TrainAuxNet):
    """Same forward as TrainAuxNet, inherited."""
