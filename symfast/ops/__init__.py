"""symfast.ops: the fused DCS ops and their Python registration.

``dcs`` (coordinate mask, paper eq. 10) and ``dcs_group`` (group gates) hold the public wrappers
of ``torch.ops.symfast.*`` (declared in ``csrc/ops.cpp``) with their fake kernels and autograd;
``checks`` validates arguments for the wrappers and the fake kernels alike; ``autograd`` holds the
glue both ops share; ``cpu_cache`` controls the kernels' cache of CPU output blocks. The functions
are public as ``symfast.dcs``, ``symfast.dcs_group`` and ``symfast.cpu_cache_info`` etc.; this
package does not re-export them, so that ``symfast.ops.dcs`` stays the module.
"""
