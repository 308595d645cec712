"""spvr_lib's own networks: the modules, their JSON specs, what the pruner may change in a spec, sizes and files.

A network is described by a JSON-serialisable *spec* (a plain dict); ``build(spec)`` returns it freshly
initialised.  Five architectures: ``"vgg"``, ``"resnet"``, ``"mlp"``, ``"mobilenetv3"`` (not prunable) and
``"segnet"``.  Every name below is read here as ``models.<name>``; the modules that hold them:

- :mod:`spvr_lib.models.networks`: the ``nn.Module`` of each architecture (``VGG``, ``ResNet`` with
  ``BasicBlock`` / ``Bottleneck``, ``MLP``, ``MobileNetV3``, ``SegNet``), ``_CLASSES`` (the class of each
  arch) and ``reinitialize`` (THE re-initialisation).
- :mod:`spvr_lib.models.specs`: the specs: ``validate``, ``build``, the presets (``PRESETS``, ``preset``,
  ``vgg16_bn``, ``resnet18``, ``resnet34``, ``resnet50``, ``mobilenetv3``, ``segnet_vgg16``) and ``spec_to_str``
  (the paper's notation).
- :mod:`spvr_lib.models.sizes`: ``count_params`` (THE parameter counter), ``spec_params``, ``model_size_mb``.
- :mod:`spvr_lib.models.widths`: the spec pruning interface: ``PrunableLayer``, ``prunable_layers``,
  ``with_widths`` (a width of 0 removes the layer or stage: "layer collapse").
- :mod:`spvr_lib.models.files`: networks on disk: ``save_network``, ``load_network``, ``network_shapes``,
  ``build_network``, ``build_source``, ``build_pruned``; a state dict known by its digest: ``state_dict_digest``,
  ``WeightsOnDemand`` (also read as ``train.state_dict_digest``, ``train.WeightsOnDemand``).

Each module imports only those above it in this list but ``files``, which imports ``networks`` and ``specs``.
"""
from spvr_lib.models.networks import (
                                      _CLASSES,
                                      MLP,
                                      VGG,
                                      BasicBlock,
                                      Bottleneck,
                                      MobileNetV3,
                                      ResNet,
                                      SegNet,
                                      reinitialize,
)
from spvr_lib.models.specs import (
                                   PRESETS,
                                   build,
                                   mobilenetv3,
                                   preset,
                                   resnet18,
                                   resnet34,
                                   resnet50,
                                   segnet_vgg16,
                                   spec_to_str,
                                   validate,
                                   vgg16_bn,
)
from spvr_lib.models.sizes import count_params, model_size_mb, spec_params
from spvr_lib.models.widths import PrunableLayer, prunable_layers, with_widths
from spvr_lib.models.files import (
                                   WeightsOnDemand,
                                   build_network,
                                   build_pruned,
                                   build_source,
                                   load_network,
                                   network_shapes,
                                   save_network,
                                   state_dict_digest,
)

__all__ = [
    "VGG", "BasicBlock", "Bottleneck", "ResNet", "MLP", "MobileNetV3", "SegNet", "reinitialize",
    "validate", "build", "PRESETS", "preset", "vgg16_bn", "resnet18", "resnet34", "resnet50", "mobilenetv3",
    "segnet_vgg16", "spec_to_str",
    "count_params", "spec_params", "model_size_mb",
    "PrunableLayer", "prunable_layers", "with_widths",
    "save_network", "load_network", "network_shapes", "build_network", "build_source", "build_pruned",
    "state_dict_digest", "WeightsOnDemand",
    "_CLASSES",     # private, but read as models._CLASSES (the class of each arch)
]
