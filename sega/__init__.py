"""SEGA: semantic guidance for Stable Diffusion (1.x, 2.x, XL) and FLUX on diffusers components.

    from sega import SegaPipeline, EditConcept
    pipe = SegaPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", dtype=torch.float16)
    out = pipe("a photo of the face of a woman", concepts=[EditConcept("smiling, smile", scale=4)],
               return_original=True, generator=torch.Generator().manual_seed(42))
"""

from .concepts import EditConcept
from .inversion import SegaInversion
from .pipeline import SegaPipeline, SegaPipelineOutput
from .pipeline_flux import SegaFluxPipeline, SegaFluxPipelineOutput
from .pipeline_xl import SegaXLPipeline
from .stopping import Stopped

__all__ = ["EditConcept", "SegaFluxPipeline", "SegaFluxPipelineOutput", "SegaInversion", "SegaPipeline",
           "SegaPipelineOutput", "SegaXLPipeline", "Stopped"]
