/* zdq._calls: the shape of a batch of calls, in one pass (see zdq/codec/tasks.py, check_calls).
 *
 * batch_submit checks every call of a batch before it packs any: each must be a tuple (fn, *args)
 * whose fn is callable, and calls that share one fn (by identity) and one length go by columns.
 * In Python that took three passes over the batch (map, count and all over iterators of C
 * functions: about 50 ns a call, 50 ms of a million calls' 370 ms on the futures path). This is
 * one loop that calls no Python code: no __eq__, __len__ or __iter__ of a user's object is asked.
 *
 * shape(calls) -> False, or (fn, width):
 *   False   calls is not an exact list, is empty, or holds something other than a non-empty
 *           exact tuple whose first item is callable (Python's own loop then names the culprit,
 *           or takes the tasks given by name);
 *   fn      the first item every call shares (compared by identity), or None when they do not
 *           share one;
 *   width   the length every call has, or 0 when they differ.
 *
 * Optional: without a C compiler at install, zdq takes the same shape in Python (codec/tasks.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *
shape(PyObject *self, PyObject *calls)
{
    if (!PyList_CheckExact(calls) || PyList_GET_SIZE(calls) == 0) {
        Py_RETURN_FALSE;
    }
    /* No Python code runs in the loop (PyCallable_Check reads a type slot, and nothing is
     * allocated): the list cannot change under it, and its items are borrowed safely. */
    Py_ssize_t n = PyList_GET_SIZE(calls);
    PyObject *head = PyList_GET_ITEM(calls, 0);
    if (!PyTuple_CheckExact(head) || PyTuple_GET_SIZE(head) == 0) {
        Py_RETURN_FALSE;
    }
    PyObject *fn = PyTuple_GET_ITEM(head, 0);
    Py_ssize_t width = PyTuple_GET_SIZE(head);
    int shared = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *call = PyList_GET_ITEM(calls, i);
        if (!PyTuple_CheckExact(call) || PyTuple_GET_SIZE(call) == 0) {
            Py_RETURN_FALSE;
        }
        if (PyTuple_GET_SIZE(call) != width) {
            width = 0;
        }
        PyObject *first = PyTuple_GET_ITEM(call, 0);
        if (first != fn) {
            shared = 0;
            if (!PyCallable_Check(first)) {
                Py_RETURN_FALSE;
            }
        }
    }
    if (!PyCallable_Check(fn)) {
        Py_RETURN_FALSE;
    }
    /* From here on, allocations may start a garbage collection, which runs Python code (a
     * __del__, a gc callback) that may empty the list and free fn: it is held first. */
    PyObject *first = shared ? fn : Py_None;
    Py_INCREF(first);
    PyObject *length = PyLong_FromSsize_t(width);
    if (length == NULL) {
        Py_DECREF(first);
        return NULL;
    }
    PyObject *answer = PyTuple_New(2);
    if (answer == NULL) {
        Py_DECREF(first);
        Py_DECREF(length);
        return NULL;
    }
    PyTuple_SET_ITEM(answer, 0, first);
    PyTuple_SET_ITEM(answer, 1, length);
    return answer;
}

static PyMethodDef methods[] = {
    {"shape", shape, METH_O,
     "shape(calls): False, or (the fn every call shares or None, the length every call has or 0)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "zdq._calls", "The shape of a batch of calls, in one pass (check_calls).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__calls(void)
{
    return PyModule_Create(&module);
}
