"""llama.cpp as an engine: GGUF files quantized per tensor by llama.cpp's own quantizer, scored from
llama.cpp's own logits, and timed in llama.cpp.

* :mod:`.binding`: the late import of ``llama-cpp-python``, its log, the GGUF type and preset names;
* :mod:`.quantize`: ``llama_model_quantize`` with per-tensor type overrides and an importance matrix;
* :mod:`.imatrix`: the importance matrix (per-column mean of squared inputs) from autocomp's own
  calibration statistics, keyed by GGUF tensor name;
* :mod:`.gguf_raw`: a GGUF file's tensor table read at the byte level (types, sizes, offsets);
* :mod:`.presets`: llama-quantize's presets as a study's baselines;
* :mod:`.runtime`: a GGUF file loaded in llama.cpp: perplexity and KL to a reference, prefill and
  decode times;
* :mod:`.latency`: the ``llamacpp`` latency engine of a study (``--latency-engine llamacpp``): each
  candidate timed as the GGUF file its export writes.
"""
