"""The Faster R-CNN itself, one module per stage in the order data flows through it.

``images`` (padding a batch) -> ``backbones`` -> ``anchors`` -> ``matching`` (labels for the
anchors) -> ``boxes`` (box coding) -> ``rpn`` (head and losses, ``losses``) -> ``proposals``
(decode, clip, NMS, top-n) -> ``roi`` (RoI Pool / Align; ``roi_sparse``, its CPU fast path) ->
``roi_heads`` (the Fast R-CNN head, its targets and post-processing) -> ``model``
(``FasterRCNN``, all of it assembled).

Nothing here imports the rest of ``rpnlab`` except ``rpnlab.config``: the detector can be read,
copied and tested on its own. Training lives in ``rpnlab.engine``, the course's views in
``rpnlab.lab``.
"""
