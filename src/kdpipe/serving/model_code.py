"""The file MLflow runs to load a kdpipe model (models from code: no pickle is read).

``kdpipe.registry.pyfunc.log_model`` hands this file to MLflow, which copies it into the
model; loading executes it with the model's ``code/`` folder on ``sys.path``. Not meant to
be imported otherwise.
"""

from mlflow.models import set_model

from kdpipe.serving.pyfunc_model import TextClassifier

set_model(TextClassifier())
