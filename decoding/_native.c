/* The per-step bookkeeping of the search and of the ONNX Runtime backend, in C.
 *
 * Each function here replaces a run of numpy calls on small arrays (a few to a few hundred
 * rows): numpy spends about a microsecond per call whatever the size, and a decoder step made
 * some sixty such calls around a graph run of a few hundred microseconds. The Python callers
 * (decoding/search.py, decoding/grid.py, server/engine/) keep the decisions readable and say
 * what each call computes; the loops live here.
 *
 * Arrays come in as numpy arrays of the documented dtype and are read C-contiguous (a copy is
 * made only where an argument is not); buffers written in place must be C-contiguous.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_2_0_API_VERSION
#include <numpy/arrayobject.h>
#include <math.h>
#include <string.h>

/* A C-contiguous view (or copy) of `obj` as `type` with `ndim` dimensions; NULL with an error set. */
static PyArrayObject *as_array(PyObject *obj, int type, int ndim, const char *name) {
    PyArrayObject *array = (PyArrayObject *)PyArray_FROMANY(obj, type, ndim, ndim, NPY_ARRAY_IN_ARRAY);
    if (array == NULL)
        PyErr_Format(PyExc_TypeError, "%s: expected a %d-d array convertible to %s", name, ndim,
                     type == NPY_INT64 ? "int64" : "float32");
    return array;
}

/* A writable C-contiguous array, written in place; NULL with an error set. */
static PyArrayObject *in_place(PyObject *obj, const char *name) {
    if (!PyArray_Check(obj) || !PyArray_ISCARRAY((PyArrayObject *)obj)) {
        PyErr_Format(PyExc_ValueError, "%s: expected a writable C-contiguous numpy array", name);
        return NULL;
    }
    return (PyArrayObject *)obj;
}

static PyArrayObject *new_array(int ndim, npy_intp *shape, int type) {
    return (PyArrayObject *)PyArray_SimpleNew(ndim, shape, type);
}

/* query_grid(row_source, sources) -> (slot_row, row_slot): see decoding/grid.py. */
static PyObject *query_grid(PyObject *self, PyObject *args) {
    PyObject *row_source_obj;
    Py_ssize_t sources;
    if (!PyArg_ParseTuple(args, "On", &row_source_obj, &sources))
        return NULL;
    PyArrayObject *row_source_array = as_array(row_source_obj, NPY_INT64, 1, "row_source");
    if (row_source_array == NULL)
        return NULL;
    const npy_int64 *row_source = PyArray_DATA(row_source_array);
    npy_intp rows = PyArray_DIM(row_source_array, 0);
    npy_int64 *seen = PyMem_Calloc(sources > 0 ? sources : 1, sizeof(npy_int64));
    npy_intp slot_count = 0;
    PyArrayObject *slot_row = NULL, *row_slot = NULL;
    if (seen == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    npy_int64 width = 1;
    for (npy_intp r = 0; r < rows; r++) {
        npy_int64 source = row_source[r];
        if (source < 0 || source >= sources) {
            PyErr_Format(PyExc_ValueError, "row %zd reads source %lld, outside [0, %zd)", (Py_ssize_t)r,
                         (long long)source, sources);
            goto done;
        }
        if (++seen[source] > width)
            width = seen[source];
    }
    slot_count = sources * width;
    npy_intp rows_shape[1] = {rows}, slots_shape[1] = {slot_count};
    row_slot = new_array(1, rows_shape, NPY_INT64);
    slot_row = (PyArrayObject *)PyArray_ZEROS(1, slots_shape, NPY_INT64, 0);
    if (row_slot == NULL || slot_row == NULL)
        goto done;
    npy_int64 *cell = PyArray_DATA(row_slot), *row_of_cell = PyArray_DATA(slot_row);
    memset(seen, 0, (sources > 0 ? sources : 1) * sizeof(npy_int64));
    for (npy_intp r = 0; r < rows; r++) {  /* a source's rows fill its cells in row order */
        npy_int64 source = row_source[r];
        cell[r] = source * width + seen[source]++;
        row_of_cell[cell[r]] = r;
    }
done:
    PyMem_Free(seen);
    Py_DECREF(row_source_array);
    if (PyErr_Occurred()) {
        Py_XDECREF(slot_row);
        Py_XDECREF(row_slot);
        return NULL;
    }
    return Py_BuildValue("NN", slot_row, row_slot);
}

/* beam_step(scores, values, choices, eos_values, history, age, min_length, max_length, k, eos_id)
 *     -> (top_scores, beams, ended, capped, next_rows, next_tokens, next_scores, next_history, next_age)
 *
 * One step of beam search (greedy: k = 1) for n sources of w rows each, from each row's best
 * K continuations: scores (n, w) float32 cumulative log-probabilities; values (n, w, K)
 * float32 and choices (n, w, K) int64 each row's best K log-probabilities and tokens, best
 * first; eos_values (n, w) float32 each row's EOS log-probability; history (n, w, T) int64;
 * age, min_length, max_length (n,) int64 each source's tokens so far and length rule.
 *
 * The length rule first: a source younger than its min_length cannot choose EOS; one at its
 * max_length can only choose EOS (capped: those sources, which end now). A source's
 * candidates are its w x K continuations, scored scores + values; the best 2k of them (k = 1:
 * the best one), best first (ties: the lower row, then the lower rank), give top_scores and
 * beams (n, 2k); fewer than 2k candidates are filled with dead ones (-inf, row 0, a token
 * other than EOS). ended: the (source, candidate) pairs among each source's first k that end
 * with EOS with a finite score, in source order. The k candidates that continue are the
 * first k not ending with EOS (then, if there are fewer, the first that do): the rows they
 * continue, numbered i * w + row (next_rows), their tokens and scores (n, k),
 * next_history (n, k, T + 1), each continuing row's history and its new token, and
 * next_age (n,), age + 1.
 */
static PyObject *beam_step(PyObject *self, PyObject *args) {
    PyObject *scores_obj, *values_obj, *choices_obj, *eos_obj, *history_obj, *age_obj, *min_obj, *max_obj;
    Py_ssize_t k;
    long long eos_id;
    if (!PyArg_ParseTuple(args, "OOOOOOOOnL", &scores_obj, &values_obj, &choices_obj, &eos_obj, &history_obj,
                          &age_obj, &min_obj, &max_obj, &k, &eos_id))
        return NULL;
    PyArrayObject *scores_array = as_array(scores_obj, NPY_FLOAT32, 2, "scores");
    PyArrayObject *values_array = as_array(values_obj, NPY_FLOAT32, 3, "values");
    PyArrayObject *choices_array = as_array(choices_obj, NPY_INT64, 3, "choices");
    PyArrayObject *eos_array = as_array(eos_obj, NPY_FLOAT32, 2, "eos_values");
    PyArrayObject *history_array = as_array(history_obj, NPY_INT64, 3, "history");
    PyArrayObject *age_array = as_array(age_obj, NPY_INT64, 1, "age");
    PyArrayObject *min_array = as_array(min_obj, NPY_INT64, 1, "min_length");
    PyArrayObject *max_array = as_array(max_obj, NPY_INT64, 1, "max_length");
    PyArrayObject *top_scores = NULL, *beams = NULL, *next_rows = NULL, *next_tokens = NULL;
    PyArrayObject *next_scores = NULL, *next_history = NULL, *next_age = NULL;
    PyObject *ended = NULL, *capped = NULL;
    npy_intp *order = NULL;
    npy_int64 *tokens = NULL;
    if (!scores_array || !values_array || !choices_array || !eos_array || !history_array || !age_array ||
        !min_array || !max_array)
        goto done;
    npy_intp n = PyArray_DIM(values_array, 0), w = PyArray_DIM(values_array, 1), per_row = PyArray_DIM(values_array, 2);
    npy_intp columns = PyArray_DIM(history_array, 2);
    if (k < 1 || w < 1 || per_row < 1 || PyArray_DIM(scores_array, 0) != n || PyArray_DIM(scores_array, 1) != w ||
        PyArray_DIM(choices_array, 0) != n || PyArray_DIM(choices_array, 1) != w ||
        PyArray_DIM(choices_array, 2) != per_row || PyArray_DIM(eos_array, 0) != n || PyArray_DIM(eos_array, 1) != w ||
        PyArray_DIM(history_array, 0) != n || PyArray_DIM(history_array, 1) != w || PyArray_DIM(age_array, 0) != n ||
        PyArray_DIM(min_array, 0) != n || PyArray_DIM(max_array, 0) != n) {
        PyErr_SetString(PyExc_ValueError, "beam_step: scores and eos_values (n, w), values and choices (n, w, K), "
                                          "history (n, w, T), age and the length rules (n,) must agree; k, w, K >= 1");
        goto done;
    }
    npy_intp width = k == 1 ? 1 : 2 * k, candidates = w * per_row;
    npy_intp top_shape[2] = {n, width}, next_shape[2] = {n, k}, history_shape[3] = {n, k, columns + 1};
    top_scores = new_array(2, top_shape, NPY_FLOAT32);
    beams = new_array(2, top_shape, NPY_INT64);
    next_rows = new_array(2, next_shape, NPY_INT64);
    next_tokens = new_array(2, next_shape, NPY_INT64);
    next_scores = new_array(2, next_shape, NPY_FLOAT32);
    next_history = new_array(3, history_shape, NPY_INT64);
    npy_intp age_shape[1] = {n};
    next_age = new_array(1, age_shape, NPY_INT64);
    ended = PyList_New(0);
    capped = PyList_New(0);
    order = PyMem_Malloc(width * sizeof(npy_intp));
    tokens = PyMem_Malloc(width * sizeof(npy_int64));
    if (!top_scores || !beams || !next_rows || !next_tokens || !next_scores || !next_history || !next_age ||
        !ended || !capped || !order || !tokens) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }
    const float *score = PyArray_DATA(scores_array), *value = PyArray_DATA(values_array);
    const float *eos_value = PyArray_DATA(eos_array);
    const npy_int64 *choice = PyArray_DATA(choices_array), *history = PyArray_DATA(history_array);
    const npy_int64 *age = PyArray_DATA(age_array), *min_length = PyArray_DATA(min_array);
    const npy_int64 *max_length = PyArray_DATA(max_array);
    float *top = PyArray_DATA(top_scores), *kept_score = PyArray_DATA(next_scores);
    npy_int64 *beam = PyArray_DATA(beams), *kept_row = PyArray_DATA(next_rows);
    npy_int64 *kept_token = PyArray_DATA(next_tokens), *kept_history = PyArray_DATA(next_history);
    npy_int64 filler = eos_id == 0 ? 1 : 0;
    npy_int64 *older = PyArray_DATA(next_age);
    for (npy_intp i = 0; i < n; i++) {
        older[i] = age[i] + 1;
        const int too_short = age[i] < min_length[i], at_cap = age[i] >= max_length[i];
        if (at_cap) {
            PyObject *index = PyLong_FromSsize_t(i);
            int failed = index == NULL || PyList_Append(capped, index) < 0;
            Py_XDECREF(index);
            if (failed)
                goto done;
        }
        const float *source_score = score + i * w, *source_value = value + i * candidates;
        const npy_int64 *source_choice = choice + i * candidates;
        float *source_top = top + i * width;
        npy_int64 *source_beam = beam + i * width;
        /* The best min(width, candidates), by insertion: a handful out of a few dozen. */
        npy_intp taken = 0, wanted = width < candidates ? width : candidates;
        for (npy_intp c = 0; c < candidates; c++) {
            float continuation = source_value[c];
            if (at_cap)
                continuation = c % per_row == 0 ? eos_value[i * w + c / per_row] : -INFINITY;
            else if (too_short && source_choice[c] == eos_id)
                continuation = -INFINITY;
            float total = source_score[c / per_row] + continuation;
            if (taken == wanted && !(total > source_top[taken - 1]))
                continue;
            npy_intp at = taken < wanted ? taken++ : taken - 1;
            while (at > 0 && total > source_top[at - 1]) {  /* strictly better: ties keep the earlier */
                source_top[at] = source_top[at - 1];
                order[at] = order[at - 1];
                at--;
            }
            source_top[at] = total;
            order[at] = c;
        }
        for (npy_intp j = 0; j < width; j++) {
            if (j < taken) {
                source_beam[j] = order[j] / per_row;
                tokens[j] = at_cap && order[j] % per_row == 0 ? eos_id : source_choice[order[j]];
            } else {
                source_top[j] = -INFINITY;
                source_beam[j] = 0;
                tokens[j] = filler;
            }
        }
        for (npy_intp j = 0; j < k && j < width; j++) {
            if (tokens[j] == eos_id && isfinite(source_top[j])) {
                PyObject *pair = Py_BuildValue("nn", (Py_ssize_t)i, (Py_ssize_t)j);
                if (pair == NULL || PyList_Append(ended, pair) < 0) {
                    Py_XDECREF(pair);
                    goto done;
                }
                Py_DECREF(pair);
            }
        }
        npy_intp kept = 0;
        for (int ending = 0; ending <= 1 && kept < k; ending++) {  /* those going on first, then the rest */
            for (npy_intp j = 0; j < width && kept < k; j++) {
                if ((tokens[j] == eos_id) != ending)
                    continue;
                npy_intp slot = i * k + kept++;
                kept_row[slot] = i * w + source_beam[j];
                kept_token[slot] = tokens[j];
                kept_score[slot] = source_top[j];
                npy_int64 *row = kept_history + slot * (columns + 1);
                memcpy(row, history + (i * w + source_beam[j]) * columns, columns * sizeof(npy_int64));
                row[columns] = tokens[j];
            }
        }
    }
done:
    PyMem_Free(order);
    PyMem_Free(tokens);
    Py_XDECREF(scores_array);
    Py_XDECREF(values_array);
    Py_XDECREF(choices_array);
    Py_XDECREF(eos_array);
    Py_XDECREF(history_array);
    Py_XDECREF(age_array);
    Py_XDECREF(min_array);
    Py_XDECREF(max_array);
    if (PyErr_Occurred()) {
        Py_XDECREF(top_scores);
        Py_XDECREF(beams);
        Py_XDECREF(ended);
        Py_XDECREF(capped);
        Py_XDECREF(next_rows);
        Py_XDECREF(next_tokens);
        Py_XDECREF(next_scores);
        Py_XDECREF(next_history);
        Py_XDECREF(next_age);
        return NULL;
    }
    return Py_BuildValue("NNNNNNNNN", top_scores, beams, ended, capped, next_rows, next_tokens, next_scores,
                         next_history, next_age);
}

/* plan_select(live, rows, used, lengths, row_source, sources)
 *     -> (chosen, copied, targets, in_order, sources_kept, moving, holes)
 *
 * The backend keeps the rows live[rows] (in this order) as buffer rows [0, kept): a kept row
 * stays in its buffer row where it can; every keep of a row after its first, and a row at or
 * above kept, is copied into a buffer row below kept that no staying row holds (targets,
 * ascending, paired with copied in the order of rows). chosen: each kept row's buffer row
 * after the copies. lengths and row_source (int64, indexed by buffer row) are updated in
 * place for the copies. in_order: whether chosen is 0, 1, ..., kept - 1.
 *
 * Source entries are kept the same way: the sources_kept entries that rows [0, kept) still
 * read become entries [0, sources_kept); a read entry at or above that end (moving,
 * ascending) moves into an unread one below it (holes, ascending, paired with moving), and
 * row_source follows for rows [0, kept).
 */
static PyObject *plan_select(PyObject *self, PyObject *args) {
    PyObject *live_obj, *rows_obj, *lengths_obj, *row_source_obj;
    Py_ssize_t used, sources;
    if (!PyArg_ParseTuple(args, "OOnOOn", &live_obj, &rows_obj, &used, &lengths_obj, &row_source_obj, &sources))
        return NULL;
    PyArrayObject *lengths_array = in_place(lengths_obj, "lengths"), *row_source_array = in_place(row_source_obj, "row_source");
    if (!lengths_array || !row_source_array)
        return NULL;
    if (PyArray_TYPE(lengths_array) != NPY_INT64 || PyArray_TYPE(row_source_array) != NPY_INT64) {
        PyErr_SetString(PyExc_TypeError, "plan_select: lengths and row_source must be int64");
        return NULL;
    }
    PyArrayObject *live_array = as_array(live_obj, NPY_INT64, 1, "live"), *rows_array = as_array(rows_obj, NPY_INT64, 1, "rows");
    PyArrayObject *chosen = NULL, *copied = NULL, *targets = NULL, *moving = NULL, *holes = NULL;
    unsigned char *seen = NULL, *stays = NULL;
    npy_intp sources_read = 0;
    int in_order = 1;
    if (!live_array || !rows_array)
        goto done;
    npy_intp kept = PyArray_DIM(rows_array, 0), held_rows = PyArray_DIM(lengths_array, 0);
    npy_intp live_count = PyArray_DIM(live_array, 0);
    const npy_int64 *live = PyArray_DATA(live_array), *rows = PyArray_DATA(rows_array);
    npy_int64 *length = PyArray_DATA(lengths_array), *row_source = PyArray_DATA(row_source_array);
    npy_intp span = used > kept ? used : kept;
    if (span > held_rows || PyArray_DIM(row_source_array, 0) < span) {
        PyErr_SetString(PyExc_ValueError, "plan_select: lengths and row_source must hold every row used and kept");
        goto done;
    }
    npy_intp shape[1] = {kept};
    chosen = new_array(1, shape, NPY_INT64);
    seen = PyMem_Calloc(span + (sources > 0 ? sources : 0) + 1, 1);
    stays = PyMem_Malloc(kept + 1);
    if (!chosen || !seen || !stays) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }
    npy_int64 *chosen_row = PyArray_DATA(chosen);
    npy_intp moved = 0;
    for (npy_intp i = 0; i < kept; i++) {
        if (rows[i] < 0 || rows[i] >= live_count || live[rows[i]] < 0 || live[rows[i]] >= span) {
            PyErr_Format(PyExc_ValueError, "plan_select: row %lld is not a live row", (long long)rows[i]);
            goto done;
        }
        npy_int64 row = live[rows[i]];
        chosen_row[i] = row;
        stays[i] = !seen[row] && row < kept;  /* a row's first keep, below the new end */
        seen[row] = 1;
        moved += !stays[i];
    }
    shape[0] = moved;
    copied = new_array(1, shape, NPY_INT64);
    targets = new_array(1, shape, NPY_INT64);
    if (!copied || !targets)
        goto done;
    npy_int64 *copied_row = PyArray_DATA(copied), *target_row = PyArray_DATA(targets);
    memset(seen, 0, span);  /* now: buffer rows held by a staying row */
    for (npy_intp i = 0; i < kept; i++)
        if (stays[i])
            seen[chosen_row[i]] = 1;
    npy_intp next_free = 0, m = 0;
    for (npy_intp i = 0; i < kept; i++) {
        if (stays[i])
            continue;
        while (seen[next_free])
            next_free++;
        copied_row[m] = chosen_row[i];
        target_row[m] = next_free;
        chosen_row[i] = next_free++;
        m++;
    }
    for (npy_intp j = 0; j < m; j++) {  /* copied rows are never targets: no order dependence */
        length[target_row[j]] = length[copied_row[j]];
        row_source[target_row[j]] = row_source[copied_row[j]];
    }
    for (npy_intp i = 0; i < kept && in_order; i++)
        in_order = chosen_row[i] == i;
    unsigned char *read = seen + span;
    for (npy_intp r = 0; r < kept; r++) {
        npy_int64 source = row_source[r];
        if (source >= 0 && source < sources && !read[source]) {
            read[source] = 1;
            sources_read++;
        }
    }
    npy_intp moves = 0;  /* read entries at or above sources_read: as many as unread ones below it */
    for (npy_intp e = sources_read; e < sources; e++)
        moves += read[e];
    npy_intp move_shape[1] = {moves};
    moving = new_array(1, move_shape, NPY_INT64);
    holes = new_array(1, move_shape, NPY_INT64);
    if (!moving || !holes)
        goto done;
    npy_int64 *moving_entry = PyArray_DATA(moving), *hole_entry = PyArray_DATA(holes);
    for (npy_intp e = sources_read, j = 0; e < sources; e++)
        if (read[e])
            moving_entry[j++] = e;
    for (npy_intp e = 0, j = 0; e < sources_read; e++)
        if (!read[e])
            hole_entry[j++] = e;
    if (moves) {
        npy_int64 *renumbered = PyMem_Malloc(sources * sizeof(npy_int64));
        if (renumbered == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        for (npy_intp e = 0; e < sources; e++)
            renumbered[e] = e;
        for (npy_intp j = 0; j < moves; j++)
            renumbered[moving_entry[j]] = hole_entry[j];
        for (npy_intp r = 0; r < kept; r++)
            if (row_source[r] >= 0 && row_source[r] < sources)
                row_source[r] = renumbered[row_source[r]];
        PyMem_Free(renumbered);
    }
done:
    PyMem_Free(seen);
    PyMem_Free(stays);
    Py_XDECREF(live_array);
    Py_XDECREF(rows_array);
    if (PyErr_Occurred()) {
        Py_XDECREF(chosen);
        Py_XDECREF(copied);
        Py_XDECREF(targets);
        Py_XDECREF(moving);
        Py_XDECREF(holes);
        return NULL;
    }
    return Py_BuildValue("NNNNnNN", chosen, copied, targets, PyBool_FromLong(in_order), sources_read, moving, holes);
}

/* write_slots(buffers, axes, new_kv, slots): each buffer's row r gets new_kv's row r at
 * position slots[r] of its position axis (2: (rows, H, positions, dk), 3: (rows, H, dk,
 * positions)); new_kv's position axis has length 1. Buffers are written in place; then every
 * row's slot (int64, in place: the rows' lengths) advances by one, to the next step's. */
static PyObject *write_slots(PyObject *self, PyObject *args) {
    PyObject *buffers, *axes, *news, *slots_obj;
    if (!PyArg_ParseTuple(args, "O!O!O!O", &PyList_Type, &buffers, &PyList_Type, &axes, &PyList_Type, &news, &slots_obj))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(buffers);
    if (PyList_GET_SIZE(axes) != count || PyList_GET_SIZE(news) != count) {
        PyErr_SetString(PyExc_ValueError, "write_slots: one axis and one new key/value per buffer");
        return NULL;
    }
    PyArrayObject *slots_array = in_place(slots_obj, "slots");
    if (slots_array == NULL)
        return NULL;
    if (PyArray_TYPE(slots_array) != NPY_INT64 || PyArray_NDIM(slots_array) != 1) {
        PyErr_SetString(PyExc_ValueError, "write_slots: slots must be a 1-d int64 array");
        return NULL;
    }
    Py_INCREF(slots_array);
    npy_int64 *slots = PyArray_DATA(slots_array);
    npy_intp rows = PyArray_DIM(slots_array, 0);
    for (Py_ssize_t b = 0; b < count; b++) {
        PyArrayObject *buffer = in_place(PyList_GET_ITEM(buffers, b), "buffer");
        long axis = PyLong_AsLong(PyList_GET_ITEM(axes, b));
        if (buffer == NULL || PyErr_Occurred())
            goto failed;
        if (PyArray_NDIM(buffer) != 4 || (axis != 2 && axis != 3)) {
            PyErr_SetString(PyExc_ValueError, "write_slots: a buffer is (rows, heads, a, b) with its positions on "
                                              "axis 2 or 3");
            goto failed;
        }
        PyArrayObject *written = (PyArrayObject *)PyArray_FROMANY(PyList_GET_ITEM(news, b), PyArray_TYPE(buffer), 4, 4,
                                                                  NPY_ARRAY_IN_ARRAY);
        if (written == NULL)
            goto failed;
        const npy_intp *shape = PyArray_DIMS(buffer), *new_shape = PyArray_DIMS(written);
        if (rows > shape[0] || new_shape[0] != rows || new_shape[1] != shape[1] || new_shape[axis] != 1 ||
            new_shape[5 - axis] != shape[5 - axis]) {
            Py_DECREF(written);
            PyErr_SetString(PyExc_ValueError, "write_slots: new key/value shapes do not match the buffer");
            goto failed;
        }
        npy_intp item = PyArray_ITEMSIZE(buffer), heads = shape[1], positions = shape[axis], dim = shape[5 - axis];
        char *out = PyArray_DATA(buffer);
        const char *in = PyArray_DATA(written);
        for (npy_intp r = 0; r < rows; r++) {
            npy_int64 slot = slots[r];
            if (slot < 0 || slot >= positions) {
                Py_DECREF(written);
                PyErr_Format(PyExc_ValueError, "write_slots: slot %lld outside the cache's %zd positions",
                             (long long)slot, (Py_ssize_t)positions);
                goto failed;
            }
            for (npy_intp h = 0; h < heads; h++) {
                char *head = out + ((r * heads + h) * positions * dim) * item;
                const char *source = in + ((r * heads + h) * dim) * item;
                if (axis == 2) {  /* (positions, dk): the slot's dk values are contiguous */
                    memcpy(head + slot * dim * item, source, dim * item);
                } else if (item == 4) {  /* (dk, positions): one value every `positions` */
                    for (npy_intp d = 0; d < dim; d++)
                        ((npy_int32 *)head)[d * positions + slot] = ((const npy_int32 *)source)[d];
                } else {
                    for (npy_intp d = 0; d < dim; d++)
                        memcpy(head + (d * positions + slot) * item, source + d * item, item);
                }
            }
        }
        Py_DECREF(written);
    }
    for (npy_intp r = 0; r < rows; r++)
        slots[r]++;
    Py_DECREF(slots_array);
    Py_RETURN_NONE;
failed:
    Py_DECREF(slots_array);
    return NULL;
}

/* resized(buffers, axes, rows, length, used) -> list: each buffer (rows, H, a, b), its
 * positions on axis 2 or 3 (axes), as a new array of `rows` rows with `length` positions:
 * rows [0, used) keep their positions (as many as fit), zero past them; the other rows are
 * left uninitialised (whoever takes them writes them first). */
static PyObject *resized(PyObject *self, PyObject *args) {
    PyObject *buffers, *axes;
    Py_ssize_t rows, length, used;
    if (!PyArg_ParseTuple(args, "O!O!nnn", &PyList_Type, &buffers, &PyList_Type, &axes, &rows, &length, &used))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(buffers);
    if (PyList_GET_SIZE(axes) != count || length < 0 || used < 0 || used > rows) {
        PyErr_SetString(PyExc_ValueError, "resized: one axis per buffer, a length >= 0 and 0 <= used <= rows");
        return NULL;
    }
    PyObject *out = PyList_New(count);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t b = 0; b < count; b++) {
        PyArrayObject *buffer = in_place(PyList_GET_ITEM(buffers, b), "buffer");
        long axis = PyLong_AsLong(PyList_GET_ITEM(axes, b));
        if (buffer == NULL || PyErr_Occurred())
            goto failed;
        if (PyArray_NDIM(buffer) != 4 || (axis != 2 && axis != 3) || used > PyArray_DIM(buffer, 0)) {
            PyErr_SetString(PyExc_ValueError, "resized: a buffer is (rows, heads, a, b) with its positions on axis 2 "
                                              "or 3, and has the used rows");
            goto failed;
        }
        npy_intp shape[4];
        memcpy(shape, PyArray_DIMS(buffer), sizeof(shape));
        npy_intp held = shape[axis], kept = held < length ? held : length, item = PyArray_ITEMSIZE(buffer);
        shape[0] = rows;
        shape[axis] = length;
        Py_INCREF(PyArray_DESCR(buffer));  /* PyArray_Empty steals it */
        PyArrayObject *grown = (PyArrayObject *)PyArray_Empty(4, shape, PyArray_DESCR(buffer), 0);
        if (grown == NULL)
            goto failed;
        /* The positions lie in runs: one per (row, head) for (positions, dk), each position dk
         * values; one per (row, head, d) for (dk, positions), each position one value. */
        npy_intp runs = used * shape[1] * (axis == 3 ? shape[2] : 1);
        npy_intp unit = item * (axis == 3 ? 1 : shape[3]);  /* bytes per position in a run */
        const char *from = PyArray_DATA(buffer);
        char *to = PyArray_DATA(grown);
        for (npy_intp run = 0; run < runs; run++) {
            memcpy(to + run * length * unit, from + run * held * unit, kept * unit);
            memset(to + (run * length + kept) * unit, 0, (length - kept) * unit);
        }
        PyList_SET_ITEM(out, b, (PyObject *)grown);
    }
    return out;
failed:
    Py_DECREF(out);
    return NULL;
}

/* cache_mask(lengths, capacity, block) -> (capacity, mask): the cache capacity a step on rows
 * of these lengths (int64) needs, the given one where it holds every row's next slot (index
 * length), else that slot rounded up to whole blocks; mask (rows, capacity) bool, true at
 * the slots a row has filled (s < length). */
static PyObject *cache_mask(PyObject *self, PyObject *args) {
    PyObject *lengths_obj;
    Py_ssize_t capacity, block;
    if (!PyArg_ParseTuple(args, "Onn", &lengths_obj, &capacity, &block))
        return NULL;
    if (block < 1) {
        PyErr_SetString(PyExc_ValueError, "cache_mask: block must be >= 1");
        return NULL;
    }
    PyArrayObject *lengths_array = as_array(lengths_obj, NPY_INT64, 1, "lengths");
    if (lengths_array == NULL)
        return NULL;
    const npy_int64 *lengths = PyArray_DATA(lengths_array);
    npy_intp rows = PyArray_DIM(lengths_array, 0);
    npy_int64 longest = 0;
    for (npy_intp r = 0; r < rows; r++)
        longest = lengths[r] > longest ? lengths[r] : longest;
    if (longest + 1 > capacity)
        capacity = (Py_ssize_t)((longest + block) / block * block);
    npy_intp shape[2] = {rows, capacity};
    PyArrayObject *mask = new_array(2, shape, NPY_BOOL);
    if (mask == NULL) {
        Py_DECREF(lengths_array);
        return NULL;
    }
    npy_bool *out = PyArray_DATA(mask);
    for (npy_intp r = 0; r < rows; r++) {
        npy_intp filled = lengths[r] < 0 ? 0 : (npy_intp)lengths[r];
        memset(out + r * capacity, 1, filled);
        memset(out + r * capacity + filled, 0, capacity - filled);
    }
    Py_DECREF(lengths_array);
    return Py_BuildValue("nN", capacity, mask);
}

/* copy_rows(buffers, rows, targets): in every buffer, row targets[j] becomes a copy of row
 * rows[j] (no row is both). */
static PyObject *copy_rows(PyObject *self, PyObject *args) {
    PyObject *buffers, *rows_obj, *targets_obj;
    if (!PyArg_ParseTuple(args, "O!OO", &PyList_Type, &buffers, &rows_obj, &targets_obj))
        return NULL;
    PyArrayObject *rows_array = as_array(rows_obj, NPY_INT64, 1, "rows");
    PyArrayObject *targets_array = as_array(targets_obj, NPY_INT64, 1, "targets");
    if (!rows_array || !targets_array)
        goto done;
    npy_intp count = PyArray_DIM(rows_array, 0);
    if (PyArray_DIM(targets_array, 0) != count) {
        PyErr_SetString(PyExc_ValueError, "copy_rows: one target per row");
        goto done;
    }
    const npy_int64 *rows = PyArray_DATA(rows_array), *targets = PyArray_DATA(targets_array);
    for (Py_ssize_t b = 0; b < PyList_GET_SIZE(buffers); b++) {
        PyArrayObject *buffer = in_place(PyList_GET_ITEM(buffers, b), "buffer");
        if (buffer == NULL)
            goto done;
        npy_intp held = PyArray_NDIM(buffer) ? PyArray_DIM(buffer, 0) : 0;
        npy_intp row_bytes = held ? PyArray_NBYTES(buffer) / held : 0;
        char *data = PyArray_DATA(buffer);
        for (npy_intp j = 0; j < count; j++) {
            if (rows[j] < 0 || rows[j] >= held || targets[j] < 0 || targets[j] >= held) {
                PyErr_SetString(PyExc_ValueError, "copy_rows: a row outside the buffer");
                goto done;
            }
            memcpy(data + targets[j] * row_bytes, data + rows[j] * row_bytes, row_bytes);
        }
    }
done:
    Py_XDECREF(rows_array);
    Py_XDECREF(targets_array);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"query_grid", query_grid, METH_VARARGS, "query_grid(row_source, sources) -> (slot_row, row_slot)"},
    {"beam_step", beam_step, METH_VARARGS,
     "beam_step(scores, values, choices, eos_values, history, age, min_length, max_length, k, eos_id) -> "
     "(top_scores, beams, ended, capped, next_rows, next_tokens, next_scores, next_history, next_age)"},
    {"plan_select", plan_select, METH_VARARGS,
     "plan_select(live, rows, used, lengths, row_source, sources) -> (chosen, copied, targets, in_order, "
     "sources_kept, moving, holes)"},
    {"write_slots", write_slots, METH_VARARGS, "write_slots(buffers, axes, new_kv, slots)"},
    {"cache_mask", cache_mask, METH_VARARGS, "cache_mask(lengths, capacity, block) -> (capacity, mask)"},
    {"resized", resized, METH_VARARGS, "resized(buffers, axes, rows, length, used) -> list of new buffers"},
    {"copy_rows", copy_rows, METH_VARARGS, "copy_rows(buffers, rows, targets)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "decoding._native",
                                    "The per-step bookkeeping of the search and its backend, in C.", -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    import_array();
    return PyModule_Create(&module);
}
