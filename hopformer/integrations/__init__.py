"""Optional integrations with other libraries (each submodule imports its own optional dependency).

Nothing in the rest of the package imports these modules: ``hopformer.integrations.transformers``
needs the ``hf`` extra (``pip install "hopformer[hf]"``).
"""
