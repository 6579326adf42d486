/* zdq._untracked: objects the garbage collector does not walk (see zdq/client/window.py, MapFuture).
 *
 * queue_pool.map returns a future per item: a million items are a million small objects that stay
 * alive until their results are read. CPython's collector walks every live tracked object in each
 * of its full collections (seven during a map of a million items), which cost the map three times
 * what its tasks did. A map's future holds nothing but its chunk and its index; while the chunk
 * holds nothing that could lead back to a future (plain scalars as its outcomes, see MapChunk),
 * no reference cycle can pass through the futures, and the collector need not see them, as
 * CPython itself leaves tuples and dicts of atoms untracked until they hold more.
 *
 * slotted(cls, n, slot_a, value_a, slot_b, values_b) makes n instances of cls as object.__new__
 * does (no __init__), sets slot_a to value_a in each and slot_b to values_b[i] in the i-th, and
 * leaves them untracked. track(obj) and track_all(list) hand objects back to the collector (a
 * no-op for one that is tracked already, or that the collector does not handle).
 * scalars(sequence) says whether every item is of exactly int, float, complex, str, bytes, bool or
 * NoneType: objects that hold no references.
 *
 * Optional: without a C compiler at install, zdq makes the same objects in Python, tracked.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

/* The byte offset of an object slot of `cls` (a member descriptor of one of its bases). */
static Py_ssize_t
slot_offset(PyTypeObject *cls, PyObject *descr)
{
    if (!Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyErr_Format(PyExc_TypeError, "slotted() needs a slot's descriptor, got %R", descr);
        return -1;
    }
    PyMemberDescrObject *member = (PyMemberDescrObject *)descr;
    if (!PyType_IsSubtype(cls, PyDescr_TYPE(member))) {
        PyErr_Format(PyExc_TypeError, "slotted(): %R is not a slot of %R", descr, (PyObject *)cls);
        return -1;
    }
    if (member->d_member->type != T_OBJECT_EX || (member->d_member->flags & READONLY)) {
        PyErr_Format(PyExc_TypeError, "slotted(): %R is not a writable object slot", descr);
        return -1;
    }
    return member->d_member->offset;
}

static PyObject *
slotted(PyObject *module, PyObject *args)
{
    PyTypeObject *cls;
    Py_ssize_t n;
    PyObject *slot_a, *value_a, *slot_b, *values_b;
    if (!PyArg_ParseTuple(args, "O!nOOOO:slotted", &PyType_Type, &cls, &n, &slot_a, &value_a, &slot_b, &values_b)) {
        return NULL;
    }
    if (cls->tp_new != PyBaseObject_Type.tp_new || !PyType_IS_GC(cls)) {
        PyErr_Format(PyExc_TypeError, "slotted(): %R must be made by object.__new__ and collected", (PyObject *)cls);
        return NULL;
    }
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "slotted(): n must be >= 0");
        return NULL;
    }
    Py_ssize_t offset_a = slot_offset(cls, slot_a);
    if (offset_a < 0) {
        return NULL;
    }
    Py_ssize_t offset_b = slot_offset(cls, slot_b);
    if (offset_b < 0) {
        return NULL;
    }
    if (offset_a == offset_b) {
        PyErr_SetString(PyExc_ValueError, "slotted(): two different slots are needed");
        return NULL;
    }
    /* A tuple of its own (the same one when it is given a tuple): a list could be changed by code
     * that the allocations below run (a collection's finalizers) while its items are read. */
    PyObject *seq = PySequence_Tuple(values_b);
    if (seq == NULL) {
        return NULL;
    }
    if (PyTuple_GET_SIZE(seq) < n) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "slotted(): %zd values for %zd objects", PyTuple_GET_SIZE(seq), n);
        return NULL;
    }
    /* The objects are made into an array of this function's own, and the list is made only once
     * they all exist: each allocation may run a collection, and with it gc.callbacks and
     * finalizers, which must never find a list whose items are not filled in yet. */
    PyObject **made = PyMem_New(PyObject *, n > 0 ? n : 1);
    PyObject *empty = made == NULL ? NULL : PyTuple_New(0);
    if (empty == NULL) {
        PyMem_Free(made);
        Py_DECREF(seq);
        return made == NULL ? PyErr_NoMemory() : NULL;
    }
    PyObject **values = ((PyTupleObject *)seq)->ob_item;
    Py_ssize_t i = 0;
    for (; i < n; i++) {
        /* object.__new__(cls): the instance's dict and weak references set up as for any other. */
        PyObject *obj = PyBaseObject_Type.tp_new(cls, empty, NULL);
        if (obj == NULL) {
            break;
        }
        Py_INCREF(value_a);
        *(PyObject **)((char *)obj + offset_a) = value_a;
        Py_INCREF(values[i]);
        *(PyObject **)((char *)obj + offset_b) = values[i];
        if (PyObject_GC_IsTracked(obj)) {
            PyObject_GC_UnTrack(obj);
        }
        made[i] = obj;
    }
    PyObject *out = i == n ? PyList_New(n) : NULL;
    if (out == NULL) {
        for (Py_ssize_t j = 0; j < i; j++) {
            Py_DECREF(made[j]);
        }
    }
    else {
        for (Py_ssize_t j = 0; j < n; j++) {  /* no allocation, no Python code: nothing runs between */
            PyList_SET_ITEM(out, j, made[j]);
        }
    }
    PyMem_Free(made);
    Py_DECREF(empty);
    Py_DECREF(seq);
    return out;
}

/* Hand obj back to the collector: only an object the collector handles (PyObject_IS_GC asks the
 * type's tp_is_gc too: a static type is not one) and that it does not track already. */
static void
track_one(PyObject *obj)
{
    if (PyObject_IS_GC(obj) && !PyObject_GC_IsTracked(obj)) {
        PyObject_GC_Track(obj);
    }
}

static PyObject *
track(PyObject *module, PyObject *obj)
{
    track_one(obj);
    Py_RETURN_NONE;
}

static PyObject *
track_all(PyObject *module, PyObject *objects)
{
    if (!PyList_CheckExact(objects)) {
        PyErr_Format(PyExc_TypeError, "track_all() needs a list, got %R", (PyObject *)Py_TYPE(objects));
        return NULL;
    }
    /* Tracking runs no Python code and allocates nothing: the list cannot change meanwhile. */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(objects); i++) {
        track_one(PyList_GET_ITEM(objects, i));
    }
    Py_RETURN_NONE;
}

static PyObject *
scalars(PyObject *module, PyObject *values)
{
    PyObject *seq = PySequence_Fast(values, "scalars() needs a sequence");  /* a list: itself */
    if (seq == NULL) {
        return NULL;
    }
    /* Reading types runs no Python code: the sequence cannot change meanwhile. */
    PyObject **items = PySequence_Fast_ITEMS(seq);
    int plain = 1;
    for (Py_ssize_t i = 0; plain && i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyTypeObject *type = Py_TYPE(items[i]);
        plain = type == &PyLong_Type || type == &PyFloat_Type || type == &PyUnicode_Type || type == &PyBytes_Type
                || type == &PyBool_Type || type == Py_TYPE(Py_None) || type == &PyComplex_Type;
    }
    Py_DECREF(seq);
    return PyBool_FromLong(plain);
}

static PyMethodDef methods[] = {
    {"slotted", slotted, METH_VARARGS,
     "slotted(cls, n, slot_a, value_a, slot_b, values_b): n untracked instances of cls, slot_a set to value_a, "
     "slot_b to values_b[i]"},
    {"track", track, METH_O, "track(obj): hand obj back to the garbage collector (if it is not tracked)"},
    {"track_all", track_all, METH_O, "track_all(objects): track(obj) for each of a list"},
    {"scalars", scalars, METH_O, "scalars(values): whether every item of a sequence is an int, float, complex, str, bytes, bool or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "zdq._untracked", "Objects the garbage collector does not walk (MapFuture).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__untracked(void)
{
    return PyModule_Create(&module);
}
