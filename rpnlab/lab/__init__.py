"""How the course looks at the detector: one module per stage holding its measurements and figures
(``anchors``, ``box_coding``, ``matching``, ``rpn``, ``proposals``, ``roi``, ``detections``), the
shared drawing (``figures``), the ipywidgets explorers (``widgets``), the paper's ablations
(``experiments``), seed statistics (``stats``), short stage trainings (``stage_training``), torchvision twins (``reference``),
notebook records (``records``), the papermill runner (``runner``), sweeps (``sweeps``) and where
they run (``executors``, ``point_worker``), and the notebook hygiene tool
(``nbclean``).
"""
