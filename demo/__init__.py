"""The embedded demo: what only the demo (and the tiny test/CI runs) need, apart from the library.

``corpus`` (spoken digits by synthetic speakers) and ``tts`` (its synthesizers), ``tasks`` (the closed
digit task), ``tiny`` (every debug-size model builder) and ``run`` (``python -m demo``: the whole
pipeline on a CPU). The library packages (``models``, ``datamodules``, ``stages``) never import it.
"""
