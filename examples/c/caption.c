/*
 * caption: caption image files with a duet bundle through the C ABI (libduet.so + duet.h).
 *
 *   cc -std=c11 -Wall -Wextra -I ffi/include examples/c/caption.c -L target/release -lduet -o caption
 *   ./caption [--provider auto|tensorrt|cuda|ort-cpu|tract] [--strict] BUNDLE IMAGE...
 *
 * Prints "PATH<TAB>CAPTION" per image on stdout and the provider report on stderr. Every
 * string duet returns is freed with duet_string_free and the runtime with duet_runtime_destroy.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "duet.h"

static int fail(const char *what, DuetStatus status, char *error) {
    fprintf(stderr, "%s failed (status %d): %s\n", what, (int)status, error ? error : "(no message)");
    duet_string_free(error);
    return 1;
}

int main(int argc, char **argv) {
    const char *provider = NULL; /* NULL = auto */
    bool strict = false;
    int i = 1;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
        if (strcmp(argv[i], "--provider") == 0 && i + 1 < argc) {
            provider = argv[++i];
        } else if (strcmp(argv[i], "--strict") == 0) {
            strict = true;
        } else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (argc - i < 2) {
        fprintf(stderr, "usage: %s [--provider P] [--strict] BUNDLE IMAGE...\n", argv[0]);
        return 2;
    }
    fprintf(stderr, "duet %s\n", duet_version());

    DuetRuntime *rt = NULL;
    char *error = NULL;
    DuetStatus status = duet_runtime_create(argv[i], provider, strict, &rt, &error);
    if (status != DUET_STATUS_OK) {
        return fail("duet_runtime_create", status, error);
    }

    char *report = NULL;
    status = duet_provider_report(rt, &report, &error);
    if (status != DUET_STATUS_OK) {
        duet_runtime_destroy(rt);
        return fail("duet_provider_report", status, error);
    }
    fprintf(stderr, "%s\n", report);
    duet_string_free(report);

    int rc = 0;
    for (i = i + 1; i < argc; i++) {
        char *caption = NULL;
        status = duet_caption_file(rt, argv[i], &caption, &error);
        if (status != DUET_STATUS_OK) {
            rc = fail(argv[i], status, error);
            error = NULL;
            continue;
        }
        printf("%s\t%s\n", argv[i], caption);
        duet_string_free(caption);
    }
    duet_runtime_destroy(rt);
    return rc;
}
