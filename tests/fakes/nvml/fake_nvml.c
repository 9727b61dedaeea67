/*
 * fake_nvml.c - a test stand-in for NVIDIA's libnvidia-ml.so.1.
 *
 * The real Python bindings (nvidia-ml-py's pynvml.py) load this library through ctypes, so tests
 * exercise the real binding code: symbol names, struct layouts, the _v2 version fields and the
 * two-call process-list protocol. Only the entry points an exporter needs are implemented; a
 * function pynvml cannot find raises NVMLError_FunctionNotFound there, as with an old driver.
 *
 * State lives in a line-based text file named by $FAKE_NVML_CONFIG, written atomically (tmp +
 * rename) by tests/fakes/nvml.py, which documents the format. It is re-read whenever its inode,
 * size or mtime changes (stat() at the start of every call), so a test can change GPU state under a
 * running process. Handles are fixed slots (GPU index x MIG slot) that survive re-reads, like real
 * handles survive a GPU falling off the bus.
 *
 * Build: cc -shared -fPIC -O2 -Wall -Werror -Wl,-soname,libnvidia-ml.so.1 -o libnvidia-ml.so.1 fake_nvml.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef int nvmlReturn_t;
enum {
    OK = 0, UNINITIALIZED = 1, INVALID_ARGUMENT = 2, NOT_SUPPORTED = 3, NO_PERMISSION = 4,
    NOT_FOUND = 6, INSUFFICIENT_SIZE = 7, DRIVER_NOT_LOADED = 9, FUNCTION_NOT_FOUND = 13,
    GPU_IS_LOST = 15, ARGUMENT_VERSION_MISMATCH = 25,
};
typedef char *nvmlDevice_t; /* opaque to callers; here a pointer into handle_slots */

/* ---- ABI structs, as in nvml.h and pynvml.py ---------------------------------------------- */
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t; /* _v2 and _v3 share this layout */
typedef struct { unsigned int version; int sensorType; int temperature; } nvmlTemperature_t;

#define STRUCT_VERSION(type, ver) ((unsigned int)(sizeof(type) | ((ver) << 24)))
#define MEMORY_V2 STRUCT_VERSION(nvmlMemory_v2_t, 2)      /* 0x02000028 */
#define TEMPERATURE_V1 STRUCT_VERSION(nvmlTemperature_t, 1) /* 0x0100000C */
_Static_assert(sizeof(nvmlMemory_v2_t) == 40, "nvmlMemory_v2_t layout");
_Static_assert(sizeof(nvmlPciInfo_t) == 68, "nvmlPciInfo_t layout");
_Static_assert(sizeof(nvmlProcessInfo_t) == 24, "nvmlProcessInfo_t layout");

/* ---- the device table ---------------------------------------------------------------------- */
#define MAX_GPUS 16
#define MAX_MIG 8
#define MAX_PROCS 32
#define MAX_FAILS 16
#define NS (-1LL)            /* "not supported" for an optional value */
#define NO_INSTANCE 0xFFFFFFFFu /* gpuInstanceId/computeInstanceId of a process on a non-MIG GPU */

struct proc { unsigned int pid; unsigned long long used; };
struct fail { char fn[64]; int code; };
struct mig {
    int present; /* 0 = empty slot */
    unsigned int gi, ci;
    char uuid[96], profile[32];
    long long mem_total, mem_used;
    int nproc; struct proc procs[MAX_PROCS];
};
struct gpu {
    char uuid[96], name[96], pci[32];
    unsigned int pci_id, pci_subsys;
    int cc_major, cc_minor;
    long long mem_total, mem_used, mem_reserved; /* mem_total == NS: memory info not supported */
    int mem_v2;
    long long util_gpu, util_mem, temp, power, power_limit, energy, pstate, fan, reasons;
    long long clocks[4]; /* graphics, sm, mem, video */
    long long ecc[2][2]; /* [corrected, uncorrected][volatile, aggregate] */
    long long mig_cur, mig_pend; /* NS: MIG not supported */
    int max_mig, mig_privileged, lost;
    int nmig; struct mig migs[MAX_MIG];
    int nproc; struct proc procs[MAX_PROCS];
    int nfail; struct fail fails[MAX_FAILS];
};
struct config {
    char driver[80], nvml[80], counter_file[512];
    int cuda, init_error, init_delay_ms, delay_ms;
    int nfail; struct fail fails[MAX_FAILS];
    int ngpu; struct gpu gpus[MAX_GPUS];
};

static struct config cfg, scratch;
static int have_cfg, refcount;
static char cfg_path[512];
static struct stat cfg_stat;
static volatile unsigned long long *shared_counter; /* mmap of counter_file, shared across processes */
static char counter_mapped[512];
static unsigned long long local_calls;
static char handle_slots[MAX_GPUS][MAX_MIG + 1]; /* slot 0: the GPU; slot k: its MIG device k-1 */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* ---- config parsing ------------------------------------------------------------------------ */
static void copy(char *dst, size_t size, const char *src) /* truncating strcpy */
{
    size_t n = strnlen(src, size - 1);
    memcpy(dst, src, n);
    dst[n] = 0;
}
#define COPY(dst, src) copy((dst), sizeof(dst), (src))

static long long num(const char *s) { return (!s[0] || !strcmp(s, "-")) ? NS : strtoll(s, NULL, 0); }

static void add_fail(int *n, struct fail *f, const char *rest)
{
    char fn[64]; int code;
    if (*n < MAX_FAILS && sscanf(rest, "%63s %i", fn, &code) == 2) {
        COPY(f[*n].fn, fn);
        f[(*n)++].code = code;
    }
}

static void add_proc(int *n, struct proc *p, const char *rest)
{
    char pid[32], used[32];
    if (*n < MAX_PROCS && sscanf(rest, "%31s %31s", pid, used) == 2) {
        p[*n].pid = (unsigned int)num(pid);
        p[(*n)++].used = (unsigned long long)num(used); /* "-" -> NVML_VALUE_NOT_AVAILABLE */
    }
}

static void parse_line(struct config *c, char *line)
{
    char key[32], a[96], b[96], d[96], e[96], f[96], p[96];
    int off = 0;
    line[strcspn(line, "\r\n")] = 0;
    if (sscanf(line, "%31s %n", key, &off) < 1 || key[0] == '#') return;
    const char *rest = line + off;
    int n = sscanf(rest, "%95s %95s %95s %95s %95s %95s", a, b, d, e, f, p);
    struct gpu *g = c->ngpu ? &c->gpus[c->ngpu - 1] : NULL;
    struct mig *m = g && g->nmig ? &g->migs[g->nmig - 1] : NULL;

    if (!strcmp(key, "driver_version")) COPY(c->driver, rest);
    else if (!strcmp(key, "nvml_version")) COPY(c->nvml, rest);
    else if (!strcmp(key, "counter_file")) COPY(c->counter_file, rest);
    else if (!strcmp(key, "cuda_version") && n >= 1) c->cuda = (int)num(a);
    else if (!strcmp(key, "init_error") && n >= 1) c->init_error = (int)num(a);
    else if (!strcmp(key, "init_delay_ms") && n >= 1) c->init_delay_ms = (int)num(a);
    else if (!strcmp(key, "delay_ms") && n >= 1) c->delay_ms = (int)num(a);
    else if (!strcmp(key, "fail") && !g) add_fail(&c->nfail, c->fails, rest);
    else if (!strcmp(key, "gpu") && n >= 1 && c->ngpu < MAX_GPUS) {
        g = &c->gpus[c->ngpu++];
        memset(g, 0, sizeof *g);
        COPY(g->uuid, a);
        g->mem_v2 = 1; g->max_mig = 7; g->mig_cur = g->mig_pend = NS;
        g->util_gpu = g->util_mem = g->temp = g->power = g->power_limit = g->energy = NS;
        g->pstate = g->fan = g->reasons = NS;
        g->clocks[0] = g->clocks[1] = g->clocks[2] = g->clocks[3] = NS;
        g->ecc[0][0] = g->ecc[0][1] = g->ecc[1][0] = g->ecc[1][1] = NS;
    } else if (!g) fprintf(stderr, "fake NVML: ignoring config line before 'gpu': %s\n", line);
    else if (!strcmp(key, "name")) COPY(g->name, rest);
    else if (!strcmp(key, "pci") && n >= 3) {
        COPY(g->pci, a);
        g->pci_id = (unsigned int)num(b); g->pci_subsys = (unsigned int)num(d);
    } else if (!strcmp(key, "cc") && n >= 2) { g->cc_major = (int)num(a); g->cc_minor = (int)num(b); }
    else if (!strcmp(key, "memory") && n >= 1) {
        g->mem_total = num(a);
        g->mem_used = n >= 2 ? num(b) : 0; g->mem_reserved = n >= 3 ? num(d) : 0;
    } else if (!strcmp(key, "memory_v2") && n >= 1) g->mem_v2 = (int)num(a);
    else if (!strcmp(key, "utilization") && n >= 1) { g->util_gpu = num(a); g->util_mem = n >= 2 ? num(b) : NS; }
    else if (!strcmp(key, "temperature") && n >= 1) g->temp = num(a);
    else if (!strcmp(key, "power") && n >= 1) g->power = num(a);
    else if (!strcmp(key, "power_limit") && n >= 1) g->power_limit = num(a);
    else if (!strcmp(key, "energy") && n >= 1) g->energy = num(a);
    else if (!strcmp(key, "pstate") && n >= 1) g->pstate = num(a);
    else if (!strcmp(key, "fan") && n >= 1) g->fan = num(a);
    else if (!strcmp(key, "clocks_event_reasons") && n >= 1) g->reasons = num(a);
    else if (!strcmp(key, "clocks") && n >= 4) {
        g->clocks[0] = num(a); g->clocks[1] = num(b); g->clocks[2] = num(d); g->clocks[3] = num(e);
    } else if (!strcmp(key, "ecc") && n >= 4) {
        g->ecc[0][0] = num(a); g->ecc[1][0] = num(b); g->ecc[0][1] = num(d); g->ecc[1][1] = num(e);
    } else if (!strcmp(key, "mig_mode") && n >= 1) { g->mig_cur = num(a); g->mig_pend = n >= 2 ? num(b) : g->mig_cur; }
    else if (!strcmp(key, "max_mig") && n >= 1) g->max_mig = (int)num(a);
    else if (!strcmp(key, "mig_privileged") && n >= 1) g->mig_privileged = (int)num(a);
    else if (!strcmp(key, "lost") && n >= 1) g->lost = (int)num(a);
    else if (!strcmp(key, "fail")) add_fail(&g->nfail, g->fails, rest);
    else if (!strcmp(key, "proc")) add_proc(&g->nproc, g->procs, rest);
    else if (!strcmp(key, "mig") && n >= 1 && g->nmig < MAX_MIG) {
        m = &g->migs[g->nmig++];
        memset(m, 0, sizeof *m);
        if (n >= 5) { /* mig GI CI UUID TOTAL USED [PROFILE]; "mig -" is an empty slot */
            m->present = 1; m->gi = (unsigned int)num(a); m->ci = (unsigned int)num(b);
            COPY(m->uuid, d);
            m->mem_total = num(e); m->mem_used = num(f);
            COPY(m->profile, n >= 6 ? p : "");
        }
    } else if (!strcmp(key, "mig_proc") && m) add_proc(&m->nproc, m->procs, rest);
    else fprintf(stderr, "fake NVML: ignoring config line: %s\n", line);
}

static void map_counter(const char *path)
{
    if (!strcmp(path, counter_mapped)) return;
    if (shared_counter) munmap((void *)shared_counter, sizeof *shared_counter);
    shared_counter = NULL;
    COPY(counter_mapped, path);
    if (!path[0]) return;
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    struct stat st;
    if (fd < 0) return;
    if (fstat(fd, &st) == 0 && st.st_size < (off_t)sizeof *shared_counter)
        if (ftruncate(fd, sizeof *shared_counter) != 0) { close(fd); return; }
    void *p = mmap(NULL, sizeof *shared_counter, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p != MAP_FAILED) shared_counter = p;
}

/* Re-read the config if the file changed; keep the last good one if it vanished. */
static void reload(void)
{
    const char *path = getenv("FAKE_NVML_CONFIG");
    struct stat st;
    if (!path || stat(path, &st) != 0) return;
    if (have_cfg && !strcmp(path, cfg_path) && st.st_ino == cfg_stat.st_ino && st.st_size == cfg_stat.st_size &&
        st.st_mtim.tv_sec == cfg_stat.st_mtim.tv_sec && st.st_mtim.tv_nsec == cfg_stat.st_mtim.tv_nsec)
        return;
    FILE *fp = fopen(path, "re");
    if (!fp) return;
    char line[1024];
    memset(&scratch, 0, sizeof scratch);
    while (fgets(line, sizeof line, fp)) parse_line(&scratch, line);
    fclose(fp);
    cfg = scratch;
    have_cfg = 1;
    cfg_stat = st;
    COPY(cfg_path, path);
    map_counter(cfg.counter_file);
}

/* ---- call prologue ------------------------------------------------------------------------- */
static nvmlReturn_t leave(nvmlReturn_t rc) { pthread_mutex_unlock(&lock); return rc; }

static void sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

static int fail_code(const struct fail *f, int n, const char *fn)
{
    for (int i = 0; i < n; i++)
        if (!strcmp(f[i].fn, fn)) return f[i].code;
    return OK;
}

/* Lock, reload, count, then check: global failure, init, delay, handle, lost, per-device failure.
 * Returns with the lock held; every caller finishes with `return leave(rc)`. */
static nvmlReturn_t enter(const char *fn, nvmlDevice_t h, struct gpu **gp, struct mig **mp)
{
    pthread_mutex_lock(&lock);
    reload();
    local_calls++;
    if (shared_counter) __atomic_add_fetch(shared_counter, 1, __ATOMIC_RELAXED);
    int rc = fail_code(cfg.fails, cfg.nfail, fn);
    if (rc) return rc;
    if (!refcount) return UNINITIALIZED;
    if (cfg.delay_ms > 0 && !strncmp(fn, "nvmlDevice", 10)) { /* a stuck driver: sleep outside the lock */
        int ms = cfg.delay_ms;
        pthread_mutex_unlock(&lock);
        sleep_ms(ms);
        pthread_mutex_lock(&lock);
        reload();
        if (!refcount) return UNINITIALIZED;
    }
    if (!gp) return OK;
    uintptr_t off = (uintptr_t)h - (uintptr_t)&handle_slots[0][0];
    if (!h || off >= sizeof handle_slots) return INVALID_ARGUMENT; /* not one of our handles */
    int gi = (int)(off / (MAX_MIG + 1)), slot = (int)(off % (MAX_MIG + 1));
    if (gi >= cfg.ngpu) return INVALID_ARGUMENT;
    struct gpu *g = &cfg.gpus[gi];
    if (slot && (slot > g->nmig || !g->migs[slot - 1].present)) return INVALID_ARGUMENT; /* stale MIG handle */
    if (g->lost) return GPU_IS_LOST;
    if (!slot && (rc = fail_code(g->fails, g->nfail, fn))) return rc;
    *gp = g;
    *mp = slot ? &g->migs[slot - 1] : NULL;
    return OK;
}

#define SYS_ENTER() do { nvmlReturn_t rc_ = enter(__func__, NULL, NULL, NULL); if (rc_) return leave(rc_); } while (0)
#define DEV_ENTER(h) struct gpu *g = NULL; struct mig *m = NULL; \
    do { nvmlReturn_t rc_ = enter(__func__, (h), &g, &m); if (rc_) return leave(rc_); } while (0)

static nvmlReturn_t put_str(char *buf, unsigned int len, const char *s)
{
    if (!buf) return INVALID_ARGUMENT;
    if (strlen(s) + 1 > len) return INSUFFICIENT_SIZE;
    memcpy(buf, s, strlen(s) + 1);
    return OK;
}

/* An optional per-GPU value (NS = not supported); MIG device handles do not report these. */
static nvmlReturn_t put_u64(const struct mig *m, long long v, unsigned long long *out)
{
    if (!out) return INVALID_ARGUMENT;
    if (m || v == NS) return NOT_SUPPORTED;
    *out = (unsigned long long)v;
    return OK;
}

static nvmlReturn_t put_uint(const struct mig *m, long long v, unsigned int *out)
{
    unsigned long long x = 0;
    nvmlReturn_t rc = put_u64(m, v, out ? &x : NULL);
    if (!rc) *out = (unsigned int)x;
    return rc;
}

static int mig_on(const struct gpu *g) { return g->mig_cur == 1; }

/* ---- init, shutdown, errors, system -------------------------------------------------------- */
static nvmlReturn_t do_init(void)
{
    pthread_mutex_lock(&lock);
    reload();
    local_calls++;
    if (shared_counter) __atomic_add_fetch(shared_counter, 1, __ATOMIC_RELAXED);
    if (cfg.init_delay_ms > 0) sleep_ms(cfg.init_delay_ms); /* a hanging init holds the lock, as NVML's does */
    if (!have_cfg) {
        fprintf(stderr, "fake NVML: FAKE_NVML_CONFIG is unset or unreadable; init fails with Driver Not Loaded\n");
        return leave(DRIVER_NOT_LOADED);
    }
    if (cfg.init_error) return leave(cfg.init_error);
    refcount++;
    return leave(OK);
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) { (void)flags; return do_init(); }
nvmlReturn_t nvmlInit_v2(void) { return do_init(); }

nvmlReturn_t nvmlShutdown(void)
{
    SYS_ENTER();
    refcount--;
    return leave(OK);
}

static const char *const error_strings[] = {
    "Success", "Uninitialized", "Invalid Argument", "Not Supported", "Insufficient Permissions",
    "Already Initialized", "Not Found", "Insufficient Size", "Insufficient External Power",
    "Driver Not Loaded", "Timeout", "Interrupt Request Issue", "NVML Shared Library Not Found",
    "Function Not Found", "Corrupted infoROM", "GPU is lost", "GPU requires restart",
    "The operating system has blocked the request.", "RM has detected an NVML/RM version mismatch.",
    "In use by another client", "Insufficient Memory", "No data", "vGPU ECC not supported",
    "Insufficient resources", "Frequency not supported", "Argument version mismatch", "Deprecated",
    "Not Ready", "GPU not found", "Invalid state",
};

const char *nvmlErrorString(nvmlReturn_t rc) /* works without init, like the real one */
{
    int n = (int)(sizeof error_strings / sizeof error_strings[0]);
    return rc >= 0 && rc < n ? error_strings[rc] : "Unknown Error";
}

unsigned long long fake_nvml_call_count(void) { return __atomic_load_n(&local_calls, __ATOMIC_RELAXED); }

void fake_nvml_reset(void) /* test helper: forget init refcount and calls */
{
    pthread_mutex_lock(&lock);
    refcount = 0;
    local_calls = 0;
    pthread_mutex_unlock(&lock);
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *buf, unsigned int len) { SYS_ENTER(); return leave(put_str(buf, len, cfg.driver)); }
nvmlReturn_t nvmlSystemGetNVMLVersion(char *buf, unsigned int len) { SYS_ENTER(); return leave(put_str(buf, len, cfg.nvml)); }

static nvmlReturn_t cuda_version(const char *fn, int *out)
{
    nvmlReturn_t rc = enter(fn, NULL, NULL, NULL);
    if (!rc && !out) rc = INVALID_ARGUMENT;
    if (!rc) *out = cfg.cuda;
    return leave(rc);
}
nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *v) { return cuda_version(__func__, v); }
nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *v) { return cuda_version(__func__, v); }

/* ---- enumeration and identity -------------------------------------------------------------- */
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count)
{
    SYS_ENTER();
    if (!count) return leave(INVALID_ARGUMENT);
    *count = (unsigned int)cfg.ngpu;
    return leave(OK);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *out)
{
    SYS_ENTER();
    if (!out || index >= (unsigned int)cfg.ngpu) return leave(INVALID_ARGUMENT);
    *out = &handle_slots[index][0];
    return leave(OK);
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *out)
{
    SYS_ENTER();
    if (!uuid || !out) return leave(INVALID_ARGUMENT);
    for (int i = 0; i < cfg.ngpu; i++) {
        struct gpu *g = &cfg.gpus[i];
        if (!strcmp(g->uuid, uuid)) { *out = &handle_slots[i][0]; return leave(OK); }
        for (int k = 0; k < g->nmig; k++)
            if (g->migs[k].present && !strcmp(g->migs[k].uuid, uuid)) { *out = &handle_slots[i][k + 1]; return leave(OK); }
    }
    return leave(NOT_FOUND);
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t h, unsigned int *index)
{
    DEV_ENTER(h);
    if (!index) return leave(INVALID_ARGUMENT);
    if (m) return leave(NOT_SUPPORTED);
    *index = (unsigned int)(g - cfg.gpus);
    return leave(OK);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t h, char *buf, unsigned int len) { DEV_ENTER(h); return leave(put_str(buf, len, m ? m->uuid : g->uuid)); }

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t h, char *buf, unsigned int len)
{
    DEV_ENTER(h);
    char name[160];
    snprintf(name, sizeof name, "%s MIG %s", g->name, m ? m->profile : ""); /* "NVIDIA A100-SXM4-80GB MIG 3g.40gb" */
    return leave(put_str(buf, len, m ? name : g->name));
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t h, nvmlPciInfo_t *pci)
{
    DEV_ENTER(h); /* a MIG device reports its parent's PCI location */
    unsigned int dom = 0, bus = 0, dev = 0, fn = 0;
    if (!pci) return leave(INVALID_ARGUMENT);
    memset(pci, 0, sizeof *pci);
    sscanf(g->pci, "%x:%x:%x.%x", &dom, &bus, &dev, &fn);
    pci->domain = dom; pci->bus = bus; pci->device = dev;
    pci->pciDeviceId = g->pci_id; pci->pciSubSystemId = g->pci_subsys;
    snprintf(pci->busId, sizeof pci->busId, "%08X:%02X:%02X.%X", dom, bus, dev, fn);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "%04X:%02X:%02X.%X", dom & 0xFFFF, bus & 0xFF, dev & 0xFF, fn & 0xF);
    return leave(OK);
}

nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t h, int *major, int *minor)
{
    DEV_ENTER(h);
    if (!major || !minor) return leave(INVALID_ARGUMENT);
    *major = g->cc_major; *minor = g->cc_minor;
    return leave(OK);
}

/* ---- memory -------------------------------------------------------------------------------- */
/* v2 semantics: used excludes reserved; v1 reports used = allocated + reserved. */
static nvmlReturn_t memory(const struct gpu *g, const struct mig *m, long long v[3])
{
    if (m) { v[0] = m->mem_total; v[1] = m->mem_used; v[2] = 0; return OK; }
    if (g->mem_total == NS) return NOT_SUPPORTED;
    v[0] = g->mem_total; v[1] = g->mem_used; v[2] = g->mem_reserved;
    return OK;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t h, nvmlMemory_t *mem)
{
    DEV_ENTER(h);
    long long v[3];
    if (!mem) return leave(INVALID_ARGUMENT);
    nvmlReturn_t rc = memory(g, m, v);
    if (rc) return leave(rc);
    mem->total = v[0]; mem->used = v[1] + v[2]; mem->free = v[0] - v[1] - v[2];
    return leave(OK);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t h, nvmlMemory_v2_t *mem)
{
    DEV_ENTER(h);
    long long v[3];
    if (!g->mem_v2) return leave(FUNCTION_NOT_FOUND); /* driver older than the v2 entry point */
    if (!mem) return leave(INVALID_ARGUMENT);
    if (mem->version != MEMORY_V2) return leave(ARGUMENT_VERSION_MISMATCH);
    nvmlReturn_t rc = memory(g, m, v);
    if (rc) return leave(rc);
    mem->total = v[0]; mem->reserved = v[2]; mem->used = v[1]; mem->free = v[0] - v[1] - v[2];
    return leave(OK);
}

/* ---- telemetry ----------------------------------------------------------------------------- */
nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t h, nvmlUtilization_t *u)
{
    DEV_ENTER(h);
    if (!u) return leave(INVALID_ARGUMENT);
    if (m || mig_on(g) || g->util_gpu == NS || g->util_mem == NS) return leave(NOT_SUPPORTED);
    u->gpu = (unsigned int)g->util_gpu; u->memory = (unsigned int)g->util_mem;
    return leave(OK);
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t h, int sensor, unsigned int *t)
{
    DEV_ENTER(h);
    if (sensor != 0) return leave(INVALID_ARGUMENT); /* NVML_TEMPERATURE_GPU only */
    return leave(put_uint(m, g->temp, t));
}

nvmlReturn_t nvmlDeviceGetTemperatureV(nvmlDevice_t h, nvmlTemperature_t *t)
{
    DEV_ENTER(h);
    if (!t) return leave(INVALID_ARGUMENT);
    if (t->version != TEMPERATURE_V1) return leave(ARGUMENT_VERSION_MISMATCH);
    if (t->sensorType != 0) return leave(INVALID_ARGUMENT);
    if (m || g->temp == NS) return leave(NOT_SUPPORTED);
    t->temperature = (int)g->temp;
    return leave(OK);
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t h, unsigned int *mw) { DEV_ENTER(h); return leave(put_uint(m, g->power, mw)); }
nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t h, unsigned int *mw) { DEV_ENTER(h); return leave(put_uint(m, g->power_limit, mw)); }
nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t h, unsigned long long *mj) { DEV_ENTER(h); return leave(put_u64(m, g->energy, mj)); }
nvmlReturn_t nvmlDeviceGetFanSpeed(nvmlDevice_t h, unsigned int *pct) { DEV_ENTER(h); return leave(put_uint(m, g->fan, pct)); }
nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t h, unsigned long long *r) { DEV_ENTER(h); return leave(put_u64(m, g->reasons, r)); }
nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t h, unsigned long long *r) { DEV_ENTER(h); return leave(put_u64(m, g->reasons, r)); }

nvmlReturn_t nvmlDeviceGetPerformanceState(nvmlDevice_t h, int *p) { DEV_ENTER(h); return leave(put_uint(m, g->pstate, (unsigned int *)p)); }

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t h, int type, unsigned int *mhz)
{
    DEV_ENTER(h);
    if (type < 0 || type > 3) return leave(INVALID_ARGUMENT);
    return leave(put_uint(m, g->clocks[type], mhz));
}

nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t h, int error_type, int counter_type, unsigned long long *count)
{
    DEV_ENTER(h);
    if (error_type < 0 || error_type > 1 || counter_type < 0 || counter_type > 1) return leave(INVALID_ARGUMENT);
    return leave(put_u64(m, g->ecc[error_type][counter_type], count));
}

/* ---- MIG ----------------------------------------------------------------------------------- */
nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t h, unsigned int *cur, unsigned int *pend)
{
    DEV_ENTER(h);
    if (!cur || !pend) return leave(INVALID_ARGUMENT);
    if (m || g->mig_cur == NS) return leave(NOT_SUPPORTED);
    *cur = (unsigned int)g->mig_cur; *pend = (unsigned int)g->mig_pend;
    return leave(OK);
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t h, unsigned int *count)
{
    DEV_ENTER(h); /* nvml.h: zero when MIG is not supported or not enabled */
    if (!count) return leave(INVALID_ARGUMENT);
    if (m) return leave(NOT_SUPPORTED);
    *count = mig_on(g) ? (unsigned int)g->max_mig : 0;
    return leave(OK);
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t h, unsigned int index, nvmlDevice_t *out)
{
    DEV_ENTER(h);
    if (!out || m) return leave(INVALID_ARGUMENT);
    if (g->mig_cur == NS) return leave(NOT_SUPPORTED);
    if (!mig_on(g) || index >= (unsigned int)g->max_mig) return leave(INVALID_ARGUMENT);
    if (index >= (unsigned int)g->nmig || index >= MAX_MIG || !g->migs[index].present) return leave(NOT_FOUND);
    *out = &handle_slots[g - cfg.gpus][index + 1];
    return leave(OK);
}

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t h, unsigned int *is_mig)
{
    DEV_ENTER(h);
    if (!is_mig) return leave(INVALID_ARGUMENT);
    *is_mig = m != NULL;
    return leave(OK);
}

static nvmlReturn_t put_instance_id(const struct mig *m, int compute, unsigned int *out)
{
    if (!out) return INVALID_ARGUMENT;
    if (!m) return NOT_SUPPORTED; /* not a MIG device handle */
    *out = compute ? m->ci : m->gi;
    return OK;
}
nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t h, unsigned int *id) { DEV_ENTER(h); return leave(put_instance_id(m, 0, id)); }
nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t h, unsigned int *id) { DEV_ENTER(h); return leave(put_instance_id(m, 1, id)); }

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t h, nvmlDevice_t *out)
{
    DEV_ENTER(h);
    if (!out || !m) return leave(INVALID_ARGUMENT);
    *out = &handle_slots[g - cfg.gpus][0];
    return leave(OK);
}

/* ---- compute processes --------------------------------------------------------------------- */
static void emit(nvmlProcessInfo_t *out, unsigned int cap, unsigned int *n, const struct proc *p,
                 unsigned int gi, unsigned int ci)
{
    if (out && *n < cap) {
        out[*n].pid = p->pid; out[*n].usedGpuMemory = p->used;
        out[*n].gpuInstanceId = gi; out[*n].computeInstanceId = ci;
    }
    (*n)++;
}

/* Two-call protocol: (count, NULL) -> SUCCESS with 0, or INSUFFICIENT_SIZE with the count. */
static nvmlReturn_t running_processes(const char *fn, nvmlDevice_t h, unsigned int *count, nvmlProcessInfo_t *out)
{
    struct gpu *g = NULL; struct mig *m = NULL;
    nvmlReturn_t rc = enter(fn, h, &g, &m);
    if (rc) return leave(rc);
    if (!count) return leave(INVALID_ARGUMENT);
    unsigned int cap = out ? *count : 0, n = 0;
    if (m) {
        for (int i = 0; i < m->nproc; i++) emit(out, cap, &n, &m->procs[i], m->gi, m->ci);
    } else if (mig_on(g)) {
        if (!g->mig_privileged) return leave(NO_PERMISSION); /* unprivileged: ask each MIG device */
        for (int k = 0; k < g->nmig; k++)
            for (int i = 0; i < g->migs[k].nproc; i++) emit(out, cap, &n, &g->migs[k].procs[i], g->migs[k].gi, g->migs[k].ci);
    } else {
        for (int i = 0; i < g->nproc; i++) emit(out, cap, &n, &g->procs[i], NO_INSTANCE, NO_INSTANCE);
    }
    *count = n;
    return leave(n > cap ? INSUFFICIENT_SIZE : OK);
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t h, unsigned int *n, nvmlProcessInfo_t *p) { return running_processes(__func__, h, n, p); }
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t h, unsigned int *n, nvmlProcessInfo_t *p) { return running_processes(__func__, h, n, p); }
