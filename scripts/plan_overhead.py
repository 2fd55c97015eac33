"""Per-call overhead of Conv2dPlan (and conv2d) over the bare Numba kernel call a plan makes,
with the same arguments (captured from one plan call): min over 30 rounds of 200 calls.

    python scripts/plan_overhead.py
"""
import time

import numpy as np

import numbaconv
from numbaconv.cpu import depthwise

rng = np.random.default_rng(0)
def measure(name, x, w, b, kernel_mod, kernel_name, **kw):
    p=numbaconv.Conv2dPlan(w,b,**kw)
    out=p(x)
    captured={}
    orig=getattr(kernel_mod,kernel_name)
    class Spy:
        def __call__(self,*a):
            captured['a']=a; return orig(*a)
    setattr(kernel_mod,kernel_name,Spy())
    # rebind: the plan's launch captured the module global at call time (looked up per call)
    p2=numbaconv.Conv2dPlan(w,b,**kw); p2(x,out=out)
    setattr(kernel_mod,kernel_name,orig)
    a=captured['a']
    ks=[];ps=[];cs=[]
    for _ in range(30):
        t0=time.perf_counter()
        for _ in range(200): orig(*a)
        t1=time.perf_counter()
        for _ in range(200): p(x,out=out)
        t2=time.perf_counter()
        for _ in range(200): numbaconv.conv2d(x,w,b,out=out,**kw)
        t3=time.perf_counter()
        ks.append((t1-t0)/200*1e6); ps.append((t2-t1)/200*1e6); cs.append((t3-t2)/200*1e6)
    k,pl,c=min(ks),min(ps),min(cs)
    print(f"{name}: bare kernel {k:.2f} us, plan {pl:.2f} us (+{pl-k:.2f}), conv2d {c:.2f} us (+{c-k:.2f})  [min of 30 x 200 calls]")
x=rng.standard_normal((1,512,14,14)).astype('f4'); w=rng.standard_normal((512,1,3,3)).astype('f4'); b=rng.standard_normal(512).astype('f4')
measure("mobilenet dw_14 NCHW", x, w, b, depthwise, "_dw_nchw_phases", padding=1, groups=512)
x=rng.standard_normal((1,32,8,8)).astype('f4'); w=rng.standard_normal((32,1,3,3)).astype('f4'); b=rng.standard_normal(32).astype('f4')
measure("small dw 32x8x8 NCHW", x, w, b, depthwise, "_dw_nchw_phases", padding=1, groups=32)
