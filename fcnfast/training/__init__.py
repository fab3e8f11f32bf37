"""The training and evaluation of fcnfast's FCN models, one module per concern.

``fcnfast.train`` is the public entry point and re-exports every public name; these modules
hold the code:

* ``config``       -- ``TrainConfig``, the optimiser presets, building the model and optimiser,
                      the settings that may not change on resume
* ``data``         -- the datasets of a config, the label scan, ``pad_collate``
* ``distributed``  -- torchrun / DistributedDataParallel set-up and collectives, the device
* ``checkpointing``-- the training checkpoint (RNG states, run files, ``load_model``); the file
                      format itself (atomic write, checked read) is ``fcnfast.checkpoints``
* ``evaluation``   -- ``evaluate`` (one confusion matrix, optionally tiled / with a CRF)
* ``loop``         -- ``train`` and its steps

The loss is ``fcnfast.losses.segmentation_loss`` (shared with the models' ``loss``).
"""
