"""``kdpipe tune``: a budgeted search for the distillation settings of one data set
(``search``), over the settings ``tune.space`` names (``space``), the best written back into
params.yaml (``write_back``)."""
