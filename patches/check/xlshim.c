/*
 * LD_PRELOAD shim that lets the patched xl run its command-line paths on a
 * machine without Xen (for check_xl_handover.py): the libxl context is a
 * dummy, xl.conf is read from $XLSHIM_CONF (missing when unset), there is
 * no hypervisor version (xl then takes autoballoon as on), 8 CPUs and no
 * domain, so every path that needs the hypervisor stops at its first
 * domain look-up with xl's own "invalid domain identifier" error.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libxl.h>
#include <libxl_utils.h>

#define XL_CONF "/etc/xen/xl.conf"

static char dummy_ctx[4096];

int libxl_ctx_alloc(libxl_ctx **pctx, int version, unsigned flags,
                    xentoollog_logger *lg)
{
    *pctx = (libxl_ctx *)dummy_ctx;
    return 0;
}

int libxl_ctx_free(libxl_ctx *ctx)
{
    return 0;
}

void libxl_childproc_setmode(libxl_ctx *ctx, const libxl_childproc_hooks *hooks,
                             void *user)
{
}

const libxl_version_info *libxl_get_version_info(libxl_ctx *ctx)
{
    return NULL;
}

int libxl_cpu_bitmap_alloc(libxl_ctx *ctx, libxl_bitmap *cpumap, int max_cpus)
{
    cpumap->size = 1; /* bytes */
    cpumap->map = calloc(1, cpumap->size);
    return cpumap->map ? 0 : ERROR_NOMEM;
}

int libxl_domain_qualifier_to_domid(libxl_ctx *ctx, const char *name,
                                    uint32_t *domid)
{
    return ERROR_INVAL;
}

/* 0 and the whole file in *data_r (malloc'd), or an errno value. */
static int read_all(const char *path, void **data_r, int *datalen_r)
{
    FILE *f = fopen(path, "rb");
    char *data = NULL;
    size_t len = 0, got;
    int e;

    if (!f)
        return errno;
    for (;;) {
        char *more = realloc(data, len + 4096);
        if (!more) {
            e = ENOMEM;
            goto fail;
        }
        data = more;
        got = fread(data + len, 1, 4096, f);
        len += got;
        if (got < 4096)
            break;
    }
    if (ferror(f)) {
        e = EIO;
        goto fail;
    }
    fclose(f);
    *data_r = data;
    *datalen_r = (int)len;
    return 0;

 fail:
    free(data);
    fclose(f);
    return e;
}

int libxl_read_file_contents(libxl_ctx *ctx, const char *filename,
                             void **data_r, int *datalen_r)
{
    int (*real)(libxl_ctx *, const char *, void **, int *);
    const char *conf;

    if (!strcmp(filename, XL_CONF)) {
        conf = getenv("XLSHIM_CONF");
        /* xl reports errno, not the value returned */
        return errno = conf ? read_all(conf, data_r, datalen_r) : ENOENT;
    }
    real = (int (*)(libxl_ctx *, const char *, void **, int *))
        dlsym(RTLD_NEXT, "libxl_read_file_contents");
    return real(ctx, filename, data_r, datalen_r);
}
