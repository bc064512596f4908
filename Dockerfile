# One image for every lqjobs role: the command picks it.
#
#   lqjobs migrate | lqjobs bridge | lqjobs callback | lqjobs scheduler
#   celery -A lqjobs.app worker --pool threads --concurrency 16
#   celery -A lqjobs.app flower
#
# Build: docker build -t lqjobs .      Run: docker run --rm lqjobs lqjobs --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Dependencies first, read from pyproject.toml alone: this layer is rebuilt only
# when pyproject.toml changes, not on every code change. The build backend is
# installed here too, so the package install below needs no network.
COPY pyproject.toml /tmp/lqjobs-build/
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/lqjobs-build/pyproject.toml', 'rb')); print('\n'.join(p['build-system']['requires'] + p['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The schema: `lqjobs migrate` looks for it under <sys.prefix>/share/lqjobs/sql
# when lqjobs is installed (sys.prefix is /usr/local in this base image).
COPY sql/ /usr/local/share/lqjobs/sql/

# The code: the lqjobs package, installed (no embedded extra:
# production images talk to real Postgres and Redis servers).
COPY README.md /tmp/lqjobs-build/
COPY lqjobs/ /tmp/lqjobs-build/lqjobs/
RUN pip install --no-deps --no-build-isolation /tmp/lqjobs-build \
    && rm -rf /tmp/lqjobs-build

# Never root. A numeric USER lets Kubernetes' runAsNonRoot verify it.
RUN groupadd --system --gid 10001 lqjobs \
    && useradd --system --uid 10001 --gid lqjobs --create-home --home-dir /home/lqjobs \
        --shell /usr/sbin/nologin lqjobs
USER 10001:10001
# An empty working directory, so `celery -A lqjobs.app` and `python -m` import the
# installed package, never a stray checkout.
WORKDIR /home/lqjobs

CMD ["lqjobs", "--help"]
