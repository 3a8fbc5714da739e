# avpea-ray on Ray's official image: the project (configs included) installed at the versions
# requirements.lock pins, so a RayJob's entrypoint (`avpea-ray train --config configs/...`)
# needs no working_dir upload. Build and push: docs/kubernetes.md ("The image"):
#   IMAGE=YOUR_AWS_ACCOUNT_ID.dkr.ecr.us-west-2.amazonaws.com/avpea-ray:0.1.0
#   docker build -t $IMAGE . && docker push $IMAGE
#
# The base image's tag names three versions, all chosen by the lock:
# - 2.60.0: the lock's ray. Every node of a cluster must run the same Ray, and the manifests'
#   rayVersion (deploy/kuberay) says the same; tests/test_deploy.py checks all three agree.
# - py311: the Python the lock was resolved and tested with (numpy 2.4 and pandas 3 in it need
#   >= 3.11; torch and the other binary wheels are per Python version).
# - cu130: the lock's torch 2.11.0 is PyPI's CUDA 13.0 build (its nvidia-*-cu13 and
#   nvidia-cuda-runtime 13.0 wheels are in the lock), so the image's CUDA is the one torch loads
#   and Ray's own GPU libraries in a cu130 image (cupy-cuda13x) agree with it. GPU nodes need an
#   NVIDIA driver >= 580 for CUDA 13, as docs/cluster.md says for the AMI. A cu12x image would
#   still run torch (it brings its own CUDA libraries) but ship a second, unused CUDA.
FROM rayproject/ray:2.60.0-py311-cu130

# METEOR (the captioning test evaluation) runs pycocoevalcap's meteor-1.5.jar, which ships with
# the pip package, in a JVM: a headless JRE is all it needs. The man directory must exist for
# the JRE's alternatives links on minimised Ubuntu images.
USER root
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends default-jre-headless \
    && rm -rf /var/lib/apt/lists/* \
    && java -version
USER ray

# The project lives where the manifests' workingDir points, so relative config paths in an
# entrypoint resolve as they do in a checkout.
WORKDIR /home/ray/avpea-ray

# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml or the lock
# changes, not on every code change. The lock is a constraints file, as scripts/setup.sh and
# cluster.yaml use it: exact versions for everything the project needs, nothing else.
COPY --chown=ray:users pyproject.toml requirements.lock ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/avpea-requirements.txt \
    && python -m pip install --no-cache-dir --disable-pip-version-check \
        --constraint requirements.lock --requirement /tmp/avpea-requirements.txt \
    && rm /tmp/avpea-requirements.txt

# The project itself (.dockerignore keeps local runs, data, tests and virtualenvs out).
# Editable, as on cluster.yaml's nodes: one copy of the code, the one beside configs/.
COPY --chown=ray:users . .
RUN python -m pip install --no-cache-dir --disable-pip-version-check --no-deps --editable . \
    && python deploy/check_image.py --python 3.11 --meteor
